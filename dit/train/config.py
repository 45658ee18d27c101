"""The training config: strict YAML loaded into typed dataclasses.

Every key is declared here with its type. An unknown key, a wrong type, or a missing file or folder is a
one-line ValueError naming the key path (e.g. `model.lora.rnak`) and what is accepted; nothing is looked up
by name from the YAML (no `target:` reflection).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

FAMILIES = ("cogvideox", "sd3", "wan")
OBJECTIVES = ("v_prediction_zero_snr", "flow_matching", "relay", "autoencoder")
SOURCES = ("shapes", "folder")
CAPTION_FORMATS = ("txt", "csv", "jsonl")
MIXED_PRECISION = ("no", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRANSFORMER_PRESETS = ("cogvideox-2b", "cogvideox-5b", "cogvideox-tiny")
RELAY_PATHS = ("vp", "flow")
DEFAULT_SHIFT = 3.0  # objective.shift when null, except for a Wan folder (its scheduler's flow shift)


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA through peft on the transformer; only the adapter is trained and saved."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TextEncoderConfig:
    """A tiny T5 encoder and word tokenizer built by dit.text (for models trained from scratch)."""

    d_model: int = 32
    num_layers: int = 1
    num_heads: int = 2
    max_length: int = 16
    seed: int = 0


@dataclass
class ModelConfig:
    """Either `pretrained` (a diffusers pipeline folder: transformer, vae, text encoder(s), tokenizer(s),
    scheduler) or a model from scratch: `transformer_preset` or `transformer` (an inline config dict with the
    diffusers class's keys), plus `vae_preset`/`vae` (a new VAE) or `vae_pretrained` (a trained VAE folder, e.g.
    an autoencoder run's `final/vae`) and `text_encoder`. `lora` trains an adapter only."""

    family: str = "cogvideox"
    pretrained: str | None = None
    transformer_preset: str | None = None
    transformer: dict[str, Any] | None = None
    vae_preset: str | None = None
    vae: dict[str, Any] | None = None
    vae_pretrained: str | None = None
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    lora: LoraConfig | None = None


@dataclass
class ObjectiveConfig:
    """The training loss and its schedule.

    v_prediction_zero_snr: CogVideoX (scaled-linear betas, SNR shift, zero terminal SNR, v-prediction).
    flow_matching: SD3 and Wan (logit-normal t with logit_mean / logit_std, then shift t' = s t / (1 + (s - 1) t);
    x_t = (1 - t) x0 + t noise, target noise - x0, the model sees t x num_train_timesteps). `shift` null (the
    default): a Wan folder's own scheduler shift (its flow_shift), 3.0 otherwise.
    relay: CogView3's relay super-resolution loss on the `relay_path` schedule, from `relay_t` of
    `num_train_timesteps`, with block noise of `block_size` mixed in at weight `noise_alpha`; the low-resolution
    input is the video downscaled by `scale_factor` and upscaled again (bilinear) before VAE encoding.
    autoencoder: trains the VAE itself (not the transformer): L1 reconstruction of a posterior sample, plus
    `l2_weight` x its squared error (which weighs the large errors of small objects more), plus `kl_weight` x
    the KL divergence to N(0, I) (all averaged per element); the export sets the VAE's
    scaling_factor so that scaled latents have unit RMS on the training data.
    """

    kind: str = "v_prediction_zero_snr"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    relay_path: str = "vp"
    relay_t: int = 500
    block_size: int = 2
    noise_alpha: float = 0.15
    scale_factor: int = 2
    kl_weight: float = 1e-4
    l2_weight: float = 0.0

    @property
    def flow_shift(self) -> float:
        """`shift`, or DEFAULT_SHIFT where it is null (validation fills a Wan folder's own in first)."""
        return DEFAULT_SHIFT if self.shift is None else self.shift


@dataclass
class DataConfig:
    """Training data: the procedural `shapes` source, or a `folder` of videos/images with captions.

    Captions: `txt` sidecars (clip.mp4 -> clip.txt), or one `captions_file` (CSV with columns file,caption, or
    JSONL objects {"file", "caption"}) relative to the folder. Clips are resized to cover the bucket, centre
    cropped, and `frames` frames taken every `frame_stride` source frames. `buckets` ([height, width, frames]
    each) group samples by aspect ratio and length; empty means one bucket (height, width, frames).
    `cache`: a folder of precomputed latents and text embeddings (`dit train CONFIG --build-cache`).
    """

    source: str = "shapes"
    shapes: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    captions: str = "txt"
    captions_file: str | None = None
    height: int = 32
    width: int = 32
    frames: int = 9
    frame_stride: int = 1
    buckets: list[list[int]] = field(default_factory=list)
    cache: str | None = None
    num_workers: int = 0
    caption_dropout: float = 0.0


@dataclass
class OptimConfig:
    """AdamW with an LR schedule from diffusers.optimization.get_scheduler."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0


@dataclass
class TrainLoopConfig:
    """Steps count optimizer updates; batch_size is per data-parallel group (per process without CP).

    Validation samples `validation_prompts`; a relay stage instead super-resolves the first `validation_items`
    clips of the data from their low-resolution versions (with their own captions).
    """

    steps: int = 100
    batch_size: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 2
    validate_every: int | None = None
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 10
    validation_guidance: float = 6.0
    validation_items: int = 2
    tensorboard: bool = False
    save_pipeline: bool = True


@dataclass
class ParallelConfig:
    """Context parallelism: ring_degree x ulysses_degree ranks share one sample's sequence."""

    ring_degree: int = 1
    ulysses_degree: int = 1

    @property
    def degree(self) -> int:
        return self.ring_degree * self.ulysses_degree


@dataclass
class TrainConfig:
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against (and built into) type `tp`; ValueError naming `where` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ValueError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _finite(value, where)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {tp!r} at {where}")


def _finite(value: Any, where: str) -> float:
    """Every float of the config passes here: NaN would slip through every range check (all its comparisons
    are false), and inf is no learning rate, norm or weight either."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return number


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ValueError(f"unknown config key {key!r}; accepted in {where or 'the top level'}: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing config key {(where + '.' if where else '') + missing[0]!r}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _choice(where: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{where}: unknown value {value!r}; accepted: {', '.join(accepted)}")


def _positive(where: str, value: float, *, zero: bool = False) -> None:
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{where}: must be {'>= 0' if zero else '> 0'}, got {value!r}")


def validate(cfg: TrainConfig, base: Path) -> TrainConfig:
    """Cross-field checks and file existence; relative paths resolve against `base` (the config's folder)."""
    _validate_model(cfg, base)
    _validate_objective(cfg)
    _validate_data(cfg, base)
    _validate_optim(cfg)
    _validate_train(cfg)
    cfg.output_dir = str(base / cfg.output_dir) if not Path(cfg.output_dir).is_absolute() else cfg.output_dir
    return cfg


def _validate_model(cfg: TrainConfig, base: Path) -> None:
    m = cfg.model
    _choice("model.family", m.family, FAMILIES)
    if m.pretrained is not None:
        m.pretrained = _existing(base, m.pretrained, "model.pretrained", folder=True)
        if not (Path(m.pretrained) / "model_index.json").is_file():
            raise ValueError(f"model.pretrained: {m.pretrained!r} has no model_index.json (a diffusers pipeline folder)")
        if m.transformer is not None or m.transformer_preset is not None:
            raise ValueError("model: give either pretrained or transformer/transformer_preset, not both")
    elif m.transformer is None and m.transformer_preset is None and cfg.objective.kind != "autoencoder":
        raise ValueError("model: give pretrained (a diffusers folder), transformer (a config) or transformer_preset")
    if m.transformer is not None and m.transformer_preset is not None:
        raise ValueError("model: give either transformer or transformer_preset, not both")
    if m.transformer_preset is not None:
        _choice("model.transformer_preset", m.transformer_preset, TRANSFORMER_PRESETS)
    if m.pretrained is None and m.family in ("sd3", "wan"):
        pipeline = {"sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline"}[m.family]
        raise ValueError(f"model.family {m.family!r} trains from a diffusers {pipeline} folder: set model.pretrained")
    if m.vae_pretrained is not None:
        if m.pretrained is not None or m.vae is not None or m.vae_preset is not None:
            raise ValueError("model.vae_pretrained: give it alone (not with pretrained, vae or vae_preset)")
        m.vae_pretrained = _existing(base, m.vae_pretrained, "model.vae_pretrained", folder=True)
    if m.lora is not None:
        _positive("model.lora.rank", m.lora.rank)
        _positive("model.lora.alpha", m.lora.alpha)
        if not m.lora.target_modules:
            raise ValueError("model.lora.target_modules: must name at least one module (e.g. to_q)")


def _validate_objective(cfg: TrainConfig) -> None:
    m, o, d, p = cfg.model, cfg.objective, cfg.data, cfg.parallel
    _choice("objective.kind", o.kind, OBJECTIVES)
    _choice("objective.relay_path", o.relay_path, RELAY_PATHS)
    _positive("objective.num_train_timesteps", o.num_train_timesteps)
    _positive("objective.logit_std", o.logit_std)
    if o.shift is None:
        o.shift = _folder_shift(m.pretrained) if m.family == "wan" and m.pretrained is not None else DEFAULT_SHIFT
    _positive("objective.shift", o.shift)
    _positive("objective.snr_shift_scale", o.snr_shift_scale)
    if not 1 <= o.relay_t <= o.num_train_timesteps - 1:
        raise ValueError(f"objective.relay_t: {o.relay_t} is outside [1, {o.num_train_timesteps - 1}]")
    _positive("objective.block_size", o.block_size)
    _positive("objective.scale_factor", o.scale_factor)
    _positive("objective.noise_alpha", o.noise_alpha, zero=True)
    _positive("objective.kl_weight", o.kl_weight, zero=True)
    _positive("objective.l2_weight", o.l2_weight, zero=True)
    if o.kind == "autoencoder":
        if m.family != "cogvideox" or m.pretrained is not None or m.lora is not None:
            raise ValueError("objective.kind 'autoencoder' trains a CogVideoX-style VAE: model.family cogvideox "
                             "with vae_preset, vae or vae_pretrained (to fine-tune it), no pretrained or lora")
        if d.cache is not None:
            raise ValueError("data.cache holds latents; objective.kind 'autoencoder' trains on pixels: remove data.cache")
        if p.ring_degree * p.ulysses_degree != 1:
            raise ValueError("parallel: context parallelism shards the transformer's sequence; an autoencoder run "
                             "trains the VAE: set ring_degree and ulysses_degree to 1")
    if m.family == "sd3" and o.kind == "v_prediction_zero_snr":
        raise ValueError("objective.kind 'v_prediction_zero_snr' does not fit model.family 'sd3'; accepted: flow_matching, relay")
    if m.family == "wan" and o.kind != "flow_matching":
        raise ValueError(f"objective.kind {o.kind!r} does not fit model.family 'wan'; accepted: flow_matching")
    if m.transformer is not None:
        _check_init_keys("model.transformer", m.transformer, "dit.models.cogvideox", "CogVideoXTransformer3DModel")
    if m.vae is not None:
        _check_init_keys("model.vae", m.vae, "vae3d.model", "CausalVAE3D")


def _validate_data(cfg: TrainConfig, base: Path) -> None:
    d = cfg.data
    _choice("data.source", d.source, SOURCES)
    if d.source == "shapes":
        from dit.data import ShapesConfig

        shapes = {"height": d.height, "width": d.width, "num_frames": d.frames, **d.shapes}
        try:
            ShapesConfig.from_dict(shapes)
        except ValueError as e:
            raise ValueError(f"data.shapes: {e}") from None
    _choice("data.captions", d.captions, CAPTION_FORMATS)
    if d.cache is not None:
        d.cache = _existing(base, d.cache, "data.cache", folder=True, hint="build it with `dit train CONFIG --build-cache`",
                            allow_missing=True)
    if d.source == "folder":
        if d.folder is None:
            raise ValueError("data.folder: required when data.source is 'folder'")
        d.folder = _existing(base, d.folder, "data.folder", folder=True)
        if d.captions != "txt":
            if d.captions_file is None:
                raise ValueError(f"data.captions_file: required for data.captions {d.captions!r}")
            _existing(Path(d.folder), d.captions_file, "data.captions_file", folder=False)
    for name in ("height", "width", "frames", "frame_stride"):
        _positive(f"data.{name}", getattr(d, name))
    for i, b in enumerate(d.buckets):
        if len(b) != 3 or min(b) < 1:
            raise ValueError(f"data.buckets[{i}]: expected [height, width, frames] of positive integers, got {b!r}")
    if not 0 <= d.caption_dropout < 1:
        raise ValueError(f"data.caption_dropout: must be in [0, 1), got {d.caption_dropout}")
    _positive("data.num_workers", d.num_workers, zero=True)


def _validate_optim(cfg: TrainConfig) -> None:
    op = cfg.optim
    _positive("optim.lr", op.lr)
    if len(op.betas) != 2 or not all(0 <= b < 1 for b in op.betas):
        raise ValueError(f"optim.betas: expected two numbers in [0, 1), got {op.betas!r}")
    _choice("optim.lr_schedule", op.lr_schedule, LR_SCHEDULES)
    _positive("optim.warmup_steps", op.warmup_steps, zero=True)
    _positive("optim.grad_accumulation", op.grad_accumulation)
    if op.max_grad_norm is not None:
        _positive("optim.max_grad_norm", op.max_grad_norm)


def _validate_train(cfg: TrainConfig) -> None:
    o, t, p = cfg.objective, cfg.train, cfg.parallel
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_last", "validation_steps"):
        _positive(f"train.{name}", getattr(t, name))
    _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ValueError(f"train.ema_decay: must be in (0, 1) or null, got {t.ema_decay}")
    _positive("train.validation_items", t.validation_items)
    if t.validate_every is not None:
        _positive("train.validate_every", t.validate_every)
        if o.kind not in ("relay", "autoencoder") and not t.validation_prompts:
            raise ValueError("train.validation_prompts: give at least one prompt when train.validate_every is set")
    _positive("parallel.ring_degree", p.ring_degree)
    _positive("parallel.ulysses_degree", p.ulysses_degree)


def _folder_shift(pretrained: str) -> float:
    """The flow shift of a Wan folder's scheduler: UniPC / DPM-Solver with use_flow_sigmas keep it as
    `flow_shift`, FlowMatchEulerDiscreteScheduler as `shift`. A folder without one (not a Wan folder: the model
    loader names what it holds) gives DEFAULT_SHIFT."""
    import json

    path = Path(pretrained) / "scheduler" / "scheduler_config.json"
    try:
        sched = json.loads(path.read_text())
    except (OSError, ValueError):
        return DEFAULT_SHIFT
    value = sched.get("flow_shift") if sched.get("use_flow_sigmas") else sched.get("shift")
    if value is None:
        return DEFAULT_SHIFT
    return _finite(value, f"objective.shift (from {str(path)!r})")


def _check_init_keys(where: str, values: dict[str, Any], module: str, cls_name: str) -> None:
    """An inline model config may only use the constructor's (diffusers config) keys."""
    import importlib
    import inspect

    cls = getattr(importlib.import_module(module), cls_name)
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = [k for k in values if k not in accepted]
    if unknown:
        raise ValueError(f"unknown config key {where + '.' + str(unknown[0])!r}; accepted: {', '.join(accepted)}")


def _existing(base: Path, value: str, where: str, *, folder: bool, hint: str = "", allow_missing: bool = False) -> str:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    ok = path.is_dir() if folder else path.is_file()
    if not ok and not (allow_missing and not path.exists()):
        kind = "folder" if folder else "file"
        raise ValueError(f"{where}: {kind} {str(path)!r} does not exist" + (f"; {hint}" if hint else ""))
    return str(path)


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    """Dotted-key overrides ({"model.pretrained": "/x"}) applied onto a nested dict."""
    out = dict(base)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_config(data: Mapping[str, Any], *, base: str | Path = ".", overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A validated TrainConfig from a parsed mapping (plus dotted-key overrides)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a training config must be a mapping at the top level, got {type(data).__name__}")
    data = _merge(dict(data), overrides or {})
    return validate(_build(TrainConfig, data, ""), Path(base))


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML training config strictly. Relative paths inside it resolve against the current directory."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return parse_config(data or {}, base=Path.cwd(), overrides=overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set key.path=value` arguments; the value is read as YAML (numbers, true/false, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=10")
        out[key.strip()] = yaml.safe_load(value)
    return out
