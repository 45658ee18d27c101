"""Regional torch.compile (dit.compile): one graph per block class, reused by every block and every denoising step
(no recompiles across steps), equal to eager, composed with the step cache, context parallelism and offload hooks;
the pipeline's `compile=` and `dit generate --compile`.

The default tests count compilations with dynamo's CompileCounter backend (it traces and guards exactly as
inductor would, without inductor's minute of C++ compilation on this CPU); the inductor run is marked slow."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dit.compile import CompileOptions, compile_blocks, compile_options, compiled_graphs, is_compiled, uncompile_blocks
from tests.distributed import run_distributed


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cogvideox(layers: int = 3, rotary: bool = True, seed: int = 0):
    from dit.models.cogvideox import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=layers, sample_width=8,
                                        sample_height=8, sample_frames=9, max_text_seq_length=7,
                                        use_rotary_positional_embeddings=rotary)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(batch: int = 2, frames: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, frames, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=g))


def _steps(model, inputs: dict, steps: int = 4, after_first=None) -> list[torch.Tensor]:
    """A denoising-like loop x <- x - 0.1 model(x, t) over decreasing t; after_first() runs after step 0."""
    x, outs = inputs["hidden_states"], []
    for i in range(steps):
        with torch.no_grad():
            out = model(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"],
                        timestep=torch.full((x.shape[0],), 900 - 200 * i), return_dict=False)[0]
        outs.append(out)
        x = x - 0.1 * out
        if i == 0 and after_first is not None:
            after_first()
    return outs


def test_options_are_checked():
    assert compile_options(None) is None and compile_options(False) is None
    assert compile_options(True) == CompileOptions()
    assert compile_options({"mode": "max-autotune"}).torch_kwargs() == {"backend": "inductor", "mode":
                                                                        "max-autotune", "fullgraph": False}
    counter = CompileCounter()
    assert compile_options({"backend": counter}).torch_kwargs()["backend"] is counter  # not a copy
    with pytest.raises(ValueError, match=r"unknown compile options \['modes'\]; accepted: backend, mode"):
        compile_options({"modes": "x"})
    with pytest.raises(ValueError, match="compile mode 'fast' is not one of"):
        compile_options({"mode": "fast"})
    with pytest.raises(ValueError, match="mode or options, not both"):
        CompileOptions(mode="max-autotune", options={"x": 1})
    with pytest.raises(ValueError, match="compile must be True, False"):
        compile_options("yes")
    with pytest.raises(ValueError, match="names no `_repeated_blocks`"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("rotary", [False, True])
def test_one_graph_for_all_blocks_and_no_recompiles_across_steps(rotary):
    model = _cogvideox(rotary=rotary)
    inputs = _inputs()
    eager = _steps(model, inputs)
    counter = CompileCounter()
    assert compile_blocks(model, {"backend": counter}) == 3 and is_compiled(model)
    seen = []
    compiled = _steps(model, inputs, after_first=lambda: seen.append(counter.frame_count))
    assert seen == [1], "the three blocks share one graph"
    assert counter.frame_count == 1, "a later step recompiled"
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    uncompile_blocks(model)
    assert not is_compiled(model)


def test_a_new_size_recompiles_once_then_is_dynamic():
    """dynamic=None: the first size static; a second size (a relay stage) makes the token dim dynamic; a third
    size compiles nothing."""
    model = _cogvideox()
    counter = CompileCounter()
    compile_blocks(model, {"backend": counter})
    for frames, expected in ((3, 1), (2, 2), (1, 2), (3, 2)):
        _steps(model, _inputs(frames=frames), steps=2)
        assert counter.frame_count == expected, (frames, counter.frame_count)


def test_every_family_compiles_regionally():
    from tests.tiny import tiny_wan_transformer

    from dit.models.mmdit import SD3Transformer2DModel

    wan = tiny_wan_transformer(0).eval()
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()
    g = torch.Generator().manual_seed(0)
    cases = [
        (wan, dict(hidden_states=torch.randn(1, wan.config.in_channels, 3, 8, 8, generator=g),
                   encoder_hidden_states=torch.randn(1, 5, wan.config.text_dim, generator=g)), 1),
        # SD3's last block is "context pre-only" (no text output): a second graph, compiled at the first step
        (sd3, dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                   encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                   pooled_projections=torch.randn(2, 8, generator=g)), 2),
    ]
    for model, kwargs, graphs in cases:
        with torch.no_grad():
            eager = [model(**kwargs, timestep=torch.tensor([t] * kwargs["hidden_states"].shape[0]),
                           return_dict=False)[0] for t in (900, 500, 100)]
            counter = CompileCounter()
            compile_blocks(model, {"backend": counter})
            for t, ref in zip((900, 500, 100), eager):
                out = model(**kwargs, timestep=torch.tensor([t] * kwargs["hidden_states"].shape[0]),
                            return_dict=False)[0]
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
                assert counter.frame_count == graphs, (type(model).__name__, counter.frame_count)


def test_diffusers_compile_repeated_blocks_idiom():
    model = _cogvideox(layers=2)
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter)  # diffusers' ModelMixin method, driven by _repeated_blocks
    _steps(model, _inputs(), steps=3)
    assert counter.frame_count == 1


def test_compile_composes_with_the_step_cache():
    from dit.cache import FirstBlockCache, caching

    model = _cogvideox()
    inputs = _inputs()
    with caching([model], FirstBlockCache(1e9, warmup=1, final=1), 6) as (cache,):
        eager = _steps(model, inputs, steps=6)
    eager_report = cache.report()
    counter = CompileCounter()
    compile_blocks(model, {"backend": counter})
    with caching([model], FirstBlockCache(1e9, warmup=1, final=1), 6) as (cache,):
        compiled = _steps(model, inputs, steps=6)
    assert cache.report() == eager_report and 0 < eager_report["computed"] < 6  # some steps skipped, the same ones
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_compile_composes_with_group_offload_hooks():
    """diffusers' block-level group offload (hooks on every block, here CPU to CPU) around compiled blocks."""
    model = _cogvideox()
    inputs = _inputs()
    eager = _steps(model, inputs, steps=3)
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
    counter = CompileCounter()
    compile_blocks(model, {"backend": counter})
    seen = []
    compiled = _steps(model, inputs, steps=3, after_first=lambda: seen.append(counter.frame_count))
    assert counter.frame_count == seen[0] >= 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pipeline_compile_option(tmp_path):
    from dit.cache import FirstBlockCache
    from dit.pipeline import DiTPipeline
    from tests.tiny import tiny_cogvideox_pipeline

    tiny_cogvideox_pipeline(tmp_path / "cog")
    eager_pipe = DiTPipeline.from_pretrained(tmp_path / "cog")
    eager_pipe.set_progress_bar_config(disable=True)
    counter = CompileCounter()
    pipe = DiTPipeline.from_pretrained(tmp_path / "cog", compile={"backend": counter})
    pipe.set_progress_bar_config(disable=True)
    assert is_compiled(pipe.transformer)
    counts = []

    def on_step(p, i, t, kwargs):
        counts.append(counter.frame_count)
        return {}

    def run(p, **kw):
        return p("a red circle", num_inference_steps=4, guidance_scale=3.0, output_type="np", num_frames=9,
                 generator=torch.Generator().manual_seed(0), **kw).frames

    ref = run(eager_pipe)
    frames = run(pipe, callback_on_step_end=on_step)
    assert counts == [counts[0]] * 4 and counts[0] >= 1, counts  # compiled at the first step, never again
    assert abs(frames - ref).max() < 1e-4
    cached = run(pipe, cache=FirstBlockCache(0.3))
    assert abs(cached - run(eager_pipe, cache=FirstBlockCache(0.3))).max() < 1e-4
    assert counter.frame_count == counts[0]
    pipe.disable_compile()
    assert not is_compiled(pipe.transformer)
    with pytest.raises(ValueError, match="unknown compile options"):
        DiTPipeline.from_pretrained(tmp_path / "cog", compile={"mod": "x"})


def test_cli_compile_and_attention_flags(tmp_path, monkeypatch, capsys):
    import dit.compile
    import dit.generate
    from dit.cli import main
    from tests.tiny import tiny_cogvideox_pipeline

    tiny_cogvideox_pipeline(tmp_path / "cog")
    args = ["generate", "a red circle", "--model", str(tmp_path / "cog"), "--frames", "9", "--height", "32",
            "--width", "32", "--steps", "2", "--guidance", "1.0"]
    assert main([*args, "-o", str(tmp_path / "bad.mp4"), "--attention", "flash9"]) == 2
    assert "--attention flash9: unknown attention backend" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "bad.mp4"), "--attention", "sdpa_cudnn"]) == 2
    calls = []
    real = dit.generate._load

    def load(*a, **k):
        pipe = real(*a, **k)
        calls.append((pipe.transformer.attn_backend, is_compiled(pipe.transformer)))
        return pipe

    monkeypatch.setattr(dit.generate, "_load", load)
    counter = CompileCounter()
    real_compile = dit.compile.compile_blocks
    monkeypatch.setattr(dit.compile, "compile_blocks", lambda model, options=True: real_compile(
        model, {"backend": counter}))  # inductor's own compile is the slow test's
    assert main([*args, "-o", str(tmp_path / "ok.mp4"), "--attention", "auto", "--compile"]) == 0
    assert calls == [("auto", True)] and (tmp_path / "ok.mp4").exists() and counter.frame_count == 1


def _parallel_compiled(rank, world):
    from dit.parallel import ContextParallelConfig

    model = _cogvideox(layers=2)
    inputs = _inputs()
    eager = _steps(model, inputs, steps=2)
    model.enable_parallelism(ContextParallelConfig(ring_degree=world))
    counter = CompileCounter()
    compile_blocks(model, {"backend": counter})
    seen = []
    compiled = _steps(model, inputs, steps=3, after_first=lambda: seen.append(counter.frame_count))
    # the context-parallel attention runs between the block's graphs (before and after it)
    assert counter.frame_count == seen[0] >= 2, (seen, counter.frame_count)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parallel
def test_compile_composes_with_context_parallelism():
    run_distributed(_parallel_compiled, 2)


@pytest.mark.slow
def test_inductor_compiles_once_for_all_steps():
    """The real compiler on the CPU (about a minute here): one graph, none later, equal to eager."""
    model = _cogvideox(rotary=False)
    inputs = _inputs()
    eager = _steps(model, inputs)
    compile_blocks(model)  # inductor
    start = compiled_graphs()
    seen = []
    compiled = _steps(model, inputs, after_first=lambda: seen.append(compiled_graphs() - start))
    assert seen == [1] and compiled_graphs() - start == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_under_compile_is_real_arithmetic_and_equal(dtype):
    """Compiled code rotates with cos / sin (inductor has no complex kernels), equal to the eager complex multiply."""
    from dit.rope import apply_rope_

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    rot = torch.polar(torch.ones(5, 4), torch.randn(5, 4, generator=g))
    compiled = torch.compile(lambda t: apply_rope_(t, rot), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.clone()).float(), apply_rope_(x.clone(), rot).float(), atol=1e-6, rtol=0)
