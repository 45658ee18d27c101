"""Regional `torch.compile`: each repeated block of a transformer compiled, one graph shared by all its blocks.

A transformer is N copies of one block, so compiling the block (not the model) costs one block's compile
time, and every block and every denoising step reuses that graph: guards check types, shapes and dtypes, not
which block instance runs (torch inlines the module's parameters as graph inputs). What lies between the blocks
stays eager, so the block stack's step cache (`dit.cache.run_blocks`), offload hooks and context parallelism
compose with it: the context-parallel attention (p2p ring, all-to-alls with host-side plans) is excluded from the
graph (`torch.compiler.disable`), so a parallel block runs as its graphs before and after the attention.

Shapes: with `dynamic=None` (default) the first call's sizes are compiled static, the fastest code; a size that
later changes (a relay stage at another resolution, another request size) makes that dimension dynamic after one
recompile (torch's automatic dynamic shapes), and nothing recompiles after that. `dynamic=True` compiles dynamic
sizes from the start, `False` one graph per size. Across the steps of one run nothing changes shape or type (the
timestep enters as a tensor, outside the blocks), so a run compiles once, at its first step (tests/test_compile.py).

The idiom diffusers users know, `model.compile_repeated_blocks(**torch_compile_kwargs)` driven by the class
attribute `_repeated_blocks`, works on our models (diffusers' ModelMixin implements it); `compile_blocks` is the
same with checked options, which `DiTPipeline.from_pretrained(..., compile=...)`, `pipe.enable_compile()` and
`dit generate --compile` use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from torch import nn

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """What `torch.compile` gets for each block. `backend`: "inductor" (default), "aot_eager", "eager", or a
    callable backend; `mode`: one of MODES; `dynamic`: None (automatic), True or False (see the module notes);
    `fullgraph`: True makes a graph break an error (not with context parallelism, whose attention runs between
    graphs); `options`: inductor options (not together with `mode`)."""

    backend: str | Callable = "inductor"
    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    options: dict | None = None

    def __post_init__(self) -> None:
        if not (callable(self.backend) or isinstance(self.backend, str)):
            raise ValueError(f"compile backend must be a name or a callable, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"compile mode {self.mode!r} is not one of {', '.join(map(repr, MODES))}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"compile dynamic must be None, True or False, got {self.dynamic!r}")
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"compile fullgraph must be True or False, got {self.fullgraph!r}")
        if self.options is not None and self.mode is not None:
            raise ValueError("compile takes mode or options, not both (torch.compile's rule)")

    def torch_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of torch.compile / nn.Module.compile (None values left out)."""
        # Not dataclasses.asdict, which deep-copies: a callable backend (a counter) must be the object passed in.
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def compile_options(value: bool | dict | CompileOptions | None) -> CompileOptions | None:
    """A user's `compile=` as options: False / None (off), True (defaults), a dict of CompileOptions fields, or
    CompileOptions; ValueError naming the accepted keys for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if isinstance(value, CompileOptions):
        return value
    if isinstance(value, dict):
        accepted = [f.name for f in fields(CompileOptions)]
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise ValueError(f"unknown compile options {unknown}; accepted: {', '.join(accepted)}")
        return CompileOptions(**value)
    raise ValueError(f"compile must be True, False, a dict of options or dit.compile.CompileOptions, got {value!r}")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose class is named in its `_repeated_blocks` (ValueError if it names none)."""
    names = getattr(model, "_repeated_blocks", None)
    if not names:
        raise ValueError(f"{type(model).__name__} names no `_repeated_blocks`, the block classes regional "
                         "compilation compiles; compile the whole module with torch.compile instead")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no module of its _repeated_blocks {list(names)}")
    return blocks


def compile_blocks(model: nn.Module, options: CompileOptions | bool | dict | None = True) -> int:
    """Compile each repeated block of `model` in place (`nn.Module.compile`: the module stays the same object, so
    state dicts, hooks, LoRA and offload are unaffected). Returns how many blocks were compiled; compiling again
    replaces the options. Compilation itself happens at the first forward."""
    options = compile_options(options)
    if options is None:
        return 0
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(**options.torch_kwargs())
    model._compile_options = options
    return len(blocks)


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_blocks` (or compile_repeated_blocks) compiled any block of `model`."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def uncompile_blocks(model: nn.Module) -> None:
    """Run every block eagerly again (the compiled code stays in torch's cache)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    model._compile_options = None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (all models): the same count before and after a
    denoising step means that step compiled (and recompiled) nothing."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))
