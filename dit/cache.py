"""Step caching: skip the transformer's block stack on steps where it would change little.

Two rules, one wrapper around the block stack (`run_blocks`, which every model's forward calls instead of its
own loop):

- First Block Cache (ParaAttention's FBCache, the rule diffusers' `FirstBlockCacheConfig` applies): run the first
  block; if its residual (output - input) changed from the last computed step's by less than `threshold`,
  relative to that residual's mean magnitude, the remaining blocks are skipped and the first block's output plus
  the last computed residual of the remaining blocks is the stack's output.
- MagCache (Ma et al. 2025): the magnitude of the stack's residual changes by a calibrated ratio per step; while
  the accumulated error of reusing the last residual, sum |1 - prod(ratios)|, stays under `threshold` (and at most
  `max_skip_steps` steps in a row, none in the first `retention_ratio` of the steps), the whole stack is skipped
  and its last residual added to its input. The ratios are the model's (`calibrate_mag_ratios` measures them).

Under context and CFG parallelism every rank must take the same decision at every step, or the collectives in
the attention would pair up wrongly. First Block Cache's relative change is a ratio of two sums over all tokens
and the whole batch; each rank sums its shard and the sums are all-reduced over the context-parallel and CFG
groups, so every rank divides the same two numbers (those of one process, up to summation order). MagCache decides
from the step index and the calibrated ratios alone, which all ranks share.

A cache is attached to a transformer for one denoising run (`caching`, which the pipelines enter with their
`cache=` argument); `StepCache.report` says which steps computed the stack and how many blocks ran.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Streams = tuple[Tensor, ...]
BlockFn = Callable[[int, nn.Module, Streams], Streams]


@dataclass(frozen=True)
class FirstBlockCache:
    """threshold: the relative change of the first block's residual under which the other blocks are skipped (0:
    never skip). warmup / final: steps at the start / end that always compute every block."""

    threshold: float
    warmup: int = 0
    final: int = 0

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        _check_count("warmup", self.warmup)
        _check_count("final", self.final)


@dataclass(frozen=True)
class MagCache:
    """threshold: the accumulated error allowed while reusing the last residual; mag_ratios: the model's residual
    magnitude ratio per step (interpolated to the run's step count); max_skip_steps: the most steps skipped in a
    row; retention_ratio: the fraction of the first steps never skipped; final: steps at the end always computed."""

    threshold: float
    mag_ratios: tuple[float, ...]
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    final: int = 0

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        if not self.mag_ratios or not all(isinstance(r, (int, float)) and r > 0 for r in self.mag_ratios):
            raise ValueError(f"mag_ratios must be a non-empty sequence of positive numbers, got {self.mag_ratios!r}; "
                             "measure them with dit.cache.calibrate_mag_ratios")
        _check_count("max_skip_steps", self.max_skip_steps)
        _check_count("final", self.final)
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")

    def ratios(self, steps: int) -> list[float]:
        """The ratios resampled to `steps` steps (nearest, end points kept, as MagCache's reference code does)."""
        n = len(self.mag_ratios)
        if steps == 1:
            return [float(self.mag_ratios[-1])]
        return [float(self.mag_ratios[round(i * (n - 1) / (steps - 1))]) for i in range(steps)]


@dataclass(frozen=True)
class MagCalibration:
    """Compute every step and record MagCache's ratios: the mean over tokens of |r_t| / |r_t-1|, r the stack's
    residual on the hidden tokens (StepCache.mag_ratios after the run; 1.0 for the first step)."""

    final: int = 0


CacheConfig = FirstBlockCache | MagCache | MagCalibration


def _check_threshold(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"cache threshold must be a number >= 0, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"cache {name} must be an integer >= 0, got {value!r}")


_SPEC = re.compile(r"^(fbc|mag):([0-9.eE+-]+)((?:,[a-z_]+=[0-9.eE+-]+)*)$")
_OPTIONS = {"fbc": {"warmup": int, "final": int}, "mag": {"max_skip_steps": int, "retention_ratio": float,
                                                          "final": int}}


def parse_cache(spec: str, mag_ratios: Sequence[float] | None = None) -> CacheConfig:
    """`fbc:0.1`, `fbc:0.1,warmup=2,final=1`, `mag:0.06,max_skip_steps=3` (the command line's --cache); MagCache
    takes the model's ratios from `mag_ratios` (a folder's generation_config.json)."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(f"cache {spec!r} is not KIND:THRESHOLD[,option=value...] with KIND fbc or mag, e.g. fbc:0.1")
    kind, threshold, rest = m.group(1), m.group(2), m.group(3)
    options = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        if key not in _OPTIONS[kind]:
            raise ValueError(f"cache option {key!r} is not one of {', '.join(_OPTIONS[kind])} for {kind}")
        try:
            options[key] = _OPTIONS[kind][key](value)
        except ValueError:
            raise ValueError(f"cache option {key}={value!r} is not a {_OPTIONS[kind][key].__name__}") from None
    try:
        value = float(threshold)
    except ValueError:
        raise ValueError(f"cache threshold {threshold!r} is not a number") from None
    if kind == "fbc":
        return FirstBlockCache(value, **options)
    if mag_ratios is None:
        raise ValueError(f"--cache {spec}: MagCache needs the model's mag_ratios (a `mag_ratios` list in the folder's "
                         "generation_config.json, measured with dit.cache.calibrate_mag_ratios); or use fbc:THRESHOLD")
    return MagCache(value, tuple(float(r) for r in mag_ratios), **options)


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class StepCache:
    """The state of one denoising run's cache on one transformer: the stored residuals, where the run is, and a
    record of each model call (whether the stack was computed, how many blocks ran)."""

    config: CacheConfig
    steps: int
    computed: dict[int, bool] = field(default_factory=dict)  # model call index -> whether the stack ran
    blocks_run: int = 0
    residual: Streams | None = None  # FBC: of the blocks after the first; MagCache: of the whole stack
    first_residual: Tensor | None = None  # FBC: the first block's, at the last computed step
    mag_ratios: dict[int, float] = field(default_factory=dict)  # MagCalibration's measurements, by model call
    clock: list[int] = field(default_factory=lambda: [0])  # [the run's model call index], shared by its experts
    _mag: tuple[float, int, float] = (1.0, 0, 0.0)  # MagCache's accumulated ratio, skipped steps, error

    @property
    def step(self) -> int:
        """The model call this run is at (one per step for single-evaluation solvers)."""
        return self.clock[0]

    def report(self) -> dict:
        report = {"calls": len(self.computed), "computed": sum(self.computed.values()), "blocks_run": self.blocks_run,
                  "computed_steps": [i for i, c in self.computed.items() if c]}
        if isinstance(self.config, MagCalibration):
            report["mag_ratios"] = [self.mag_ratios[i] for i in sorted(self.mag_ratios)]
        return report

    def _always(self) -> bool:
        final = self.config.final
        warmup = self.config.warmup if isinstance(self.config, FirstBlockCache) else int(
            self.config.retention_ratio * self.steps + 0.5)  # MagCache's rounding of the retained steps
        return self.step < warmup or (final > 0 and self.step >= self.steps - final)

    def run(self, model: nn.Module, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams,
            hidden: Callable[[Streams], Tensor]) -> Streams:
        if isinstance(self.config, FirstBlockCache):
            out = self._run_fbc(model, blocks, block_fn, streams, hidden)
        elif isinstance(self.config, MagCache):
            out = self._run_mag(blocks, block_fn, streams)
        else:
            out = self._calibrate(model, blocks, block_fn, streams, hidden)
        self.clock[0] += 1
        return out

    def _blocks(self, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams, start: int) -> Streams:
        for i in range(start, len(blocks)):
            streams = block_fn(i, blocks[i], streams)
        self.blocks_run += len(blocks) - start
        return streams

    def _run_fbc(self, model: nn.Module, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams,
                 hidden: Callable[[Streams], Tensor]) -> Streams:
        before = hidden(streams).clone()  # blocks may update their input in place (CogVideoX's low-memory path)
        first = block_fn(0, blocks[0], streams)
        self.blocks_run += 1
        r = hidden(first) - before  # the first block's residual on the hidden (image / video) tokens
        del before
        skip = (not self._always() and self.residual is not None
                and _relative_change(model, r, self.first_residual) < self.config.threshold)
        self.computed[self.step] = not skip
        if skip:
            return _add(first, self.residual)
        self.first_residual = r
        head = _clone(first)
        out = self._blocks(blocks, block_fn, first, 1)
        self.residual = _residual(out, head)
        return out

    def _run_mag(self, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams) -> Streams:
        skip = False
        if not self._always():
            ratio, skipped, err = self._mag
            ratio *= self.config.ratios(self.steps)[min(self.step, self.steps - 1)]
            skipped, err = skipped + 1, err + abs(1.0 - ratio)
            skip = self.residual is not None and err <= self.config.threshold and skipped <= self.config.max_skip_steps
            self._mag = (ratio, skipped, err) if skip else (1.0, 0, 0.0)
        self.computed[self.step] = not skip
        if skip:
            return _add(streams, self.residual)
        before = _clone(streams)  # blocks may update their input in place (CogVideoX's low-memory path)
        out = self._blocks(blocks, block_fn, streams, 0)
        self.residual = _residual(out, before)
        return out


    def _calibrate(self, model: nn.Module, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams,
                   hidden: Callable[[Streams], Tensor]) -> Streams:
        before = hidden(streams).clone()  # blocks may update their input in place
        out = self._blocks(blocks, block_fn, streams, 0)
        self.computed[self.step] = True
        r = hidden(out) - before
        if self.first_residual is None:
            self.mag_ratios[self.step] = 1.0
        else:  # token-wise norms, in fp32 as the reference measures them
            ratio = r.float().norm(dim=-1) / (self.first_residual.float().norm(dim=-1) + 1e-8)
            total, count = _global_sums(model, torch.stack([ratio.sum(), ratio.new_tensor(ratio.numel())]))
            self.mag_ratios[self.step] = total / count
        self.first_residual = r
        return out


def _residual(out: Streams, inp: Streams) -> Streams:
    """out - inp per stream; None where the stack ends a stream (SD3's last block leaves no text tokens)."""
    return tuple(None if o is None else o - i for o, i in zip(out, inp))


def _clone(streams: Streams) -> Streams:
    return tuple(None if x is None else x.clone() for x in streams)


def _add(streams: Streams, residual: Streams) -> Streams:
    return tuple(None if r is None else s + r for s, r in zip(streams, residual))


def _relative_change(model: nn.Module, r: Tensor, previous: Tensor) -> float:
    """sum |r - previous| / sum |previous| over every token and batch element of the model call, the same number
    on every rank of a context- or CFG-parallel model (this rank's sums all-reduced over both groups)."""
    changed, scale = _global_sums(model, torch.stack([(r - previous).abs().sum(), previous.abs().sum()]))
    return changed / scale if scale > 0 else float("inf")


def _global_sums(model: nn.Module, sums: Tensor) -> list[float]:
    """This rank's partial sums added over the context-parallel and CFG groups of a parallel model (every rank
    then holds the sums over the whole model call)."""
    sums = sums.double()
    cp = getattr(model, "_cp", None)
    if cp is not None:
        context = cp.context
        dist.all_reduce(sums, group=context.cp_group)
        if context.config.cfg_degree > 1:
            dist.all_reduce(sums, group=context.cfg_group)
    return sums.tolist()


# ----------------------------------------------------------------------------------------------- the block stack


def run_blocks(model: nn.Module, blocks: Sequence[nn.Module], block_fn: BlockFn, streams: Streams,
               hidden: Callable[[Streams], Tensor] = lambda s: s[0]) -> Streams:
    """The model's block stack: block_fn(i, block, streams) -> streams for each block in order, or, while a step
    cache is attached (`caching`), the cache's decision around them. `hidden` picks the image / video tokens whose
    change First Block Cache measures."""
    cache: StepCache | None = getattr(model, "_step_cache", None)
    if cache is not None:
        return cache.run(model, blocks, block_fn, streams, hidden)
    for i, block in enumerate(blocks):
        streams = block_fn(i, block, streams)
    return streams


def check_cache(cache: object) -> None:
    """A pipeline's `cache=` argument: None or one of our cache configs (checked before any model runs)."""
    if cache is not None and not isinstance(cache, (FirstBlockCache, MagCache, MagCalibration)):
        hint = " (diffusers' configs go to transformer.enable_cache)" if type(cache).__module__.startswith(
            "diffusers") else ""
        raise ValueError(f"cache must be None or a dit.cache.FirstBlockCache, MagCache or MagCalibration, got "
                         f"{type(cache).__name__}{hint}")


@contextlib.contextmanager
def caching(models: Sequence[nn.Module], config: CacheConfig | None, steps: int) -> Iterator[list[StepCache]]:
    """Attach a fresh StepCache to each transformer for one denoising run of `steps` steps (Wan 2.2's two
    experts each keep their own residuals); yields them, for their reports."""
    if config is None:
        yield []
        return
    check_cache(config)
    clock = [0]
    caches = [StepCache(config, steps, clock=clock) for _ in models]
    previous = [getattr(model, "_step_cache", None) for model in models]  # a cache enabled on the model itself
    for model, cache in zip(models, caches):
        model._step_cache = cache
    try:
        yield caches
    finally:
        for model, cache in zip(models, previous):
            model._step_cache = cache


def merge_reports(caches: Sequence[StepCache]) -> dict:
    """One report for a run whose calls went to several transformers (Wan 2.2's experts)."""
    reports = [c.report() for c in caches]
    merged = {"cache": caches[0].config.__class__.__name__, "calls": sum(r["calls"] for r in reports),
              "computed": sum(r["computed"] for r in reports), "blocks_run": sum(r["blocks_run"] for r in reports),
              "computed_steps": sorted(i for r in reports for i in r["computed_steps"])}
    if isinstance(caches[0].config, MagCalibration):
        ratios = {i: r for c in caches for i, r in c.mag_ratios.items()}
        merged["mag_ratios"] = [ratios[i] for i in sorted(ratios)]
    return merged


# ----------------------------------------------------------------------------------------------- diffusers' API


def from_diffusers_config(config: object) -> tuple[CacheConfig, int | None]:
    """diffusers' FirstBlockCacheConfig / MagCacheConfig as ours (with MagCache's step count); every other diffusers
    cache hooks attention modules we do not have, so it is refused, naming what we offer instead."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    if isinstance(config, FirstBlockCache):
        return config, None
    if isinstance(config, (MagCache, MagCalibration)):
        raise ValueError(f"{type(config).__name__} needs the run's step count: pass it as the pipeline's cache= "
                         "argument, or enable diffusers' MagCacheConfig(num_inference_steps=...) on the model")
    if isinstance(config, FirstBlockCacheConfig):
        return FirstBlockCache(config.threshold), None
    if isinstance(config, MagCacheConfig):
        steps = config.num_inference_steps
        if config.calibrate:
            return MagCalibration(), steps
        return MagCache(config.threshold, tuple(float(r) for r in config.mag_ratios), config.max_skip_steps,
                        config.retention_ratio), steps
    raise ValueError(f"{type(config).__name__} is not supported on this transformer: its hooks target diffusers' "
                     "attention processors, and this model has one attention function (no processors), so they would "
                     "never fire. Use FirstBlockCacheConfig or MagCacheConfig, or the pipelines' cache= argument "
                     "(dit.cache.FirstBlockCache / MagCache)")


class StepCacheMixin:
    """diffusers' CacheMixin API (`enable_cache`, `disable_cache`, `cache_context`, `is_cache_enabled`) on our
    transformers, backed by dit.cache: the cache stays on the model across calls, one state per cache context
    (diffusers' pipelines name "cond" / "uncond" / "cond_uncond"), reset when a pipeline finishes
    (`_reset_stateful_cache`) and, for MagCache, after its num_inference_steps calls, as diffusers' hooks do."""

    _cache_config: CacheConfig | None = None
    _step_cache: StepCache | None = None

    @property
    def is_cache_enabled(self) -> bool:
        return self._cache_config is not None

    def enable_cache(self, config: object) -> None:
        if self.is_cache_enabled:
            raise ValueError(f"Caching has already been enabled with {type(self._cache_config).__name__}; call "
                             "disable_cache() before enabling another")
        self._cache_config, self._cache_steps = from_diffusers_config(config)
        self._reset_stateful_cache()

    def disable_cache(self) -> None:
        if not self.is_cache_enabled:
            raise ValueError("Caching techniques have not been enabled, so there's nothing to disable.")
        self._cache_config = self._step_cache = None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        self._cache_states: dict[str, StepCache] = {}
        self._step_cache = self._cache_state("inference") if self.is_cache_enabled else None

    def _cache_state(self, name: str) -> StepCache:
        if name not in self._cache_states:
            self._cache_states[name] = _PersistentStepCache(self._cache_config, self._cache_steps or 0)
        return self._cache_states[name]

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: object) -> Iterator[None]:
        if not self.is_cache_enabled:
            yield
            return
        previous, self._step_cache = self._step_cache, self._cache_state(name)
        try:
            yield
        finally:
            self._step_cache = previous


class _PersistentStepCache(StepCache):
    """A StepCache that starts over after `steps` calls (diffusers' MagCache; FirstBlockCache has no step count)."""

    def run(self, *args, **kwargs) -> Streams:
        out = super().run(*args, **kwargs)
        if self.steps and self.step >= self.steps:
            if isinstance(self.config, MagCalibration):  # diffusers reports them the same way, then starts over
                logger.info("MagCache calibration: mag_ratios=%s", self.report()["mag_ratios"])
            self.clock[0], self.residual, self.first_residual, self._mag = 0, None, None, (1.0, 0, 0.0)
            self.mag_ratios, self.computed, self.blocks_run = {}, {}, 0
        return out
