"""The one-shot GPU check: everything this project measures on one GPU, in one command, into one JSON file.

    python bench/gpu.py --out DIR            # on the GPU machine (about 8 minutes on one H100)
    python bench/gpu.py --out DIR --dry-run  # anywhere: validates the plan without CUDA

Sections, in order of priority, each in its own process with its own time box (the JSON is rewritten as every
figure arrives, so a section cut off by its time box, or the whole run by the machine's, still returns what it
measured; a section that fails or runs out of memory leaves its error and the next one starts):

- env: torch / CUDA / cuDNN / GPU, the installed packages, which attention kernels are installed.
- attention: each installed kernel (dit.attention.BACKENDS) at CogVideoX-2B's and Wan-1.3B's full attention shapes
  in bf16: time, output and log-sum-exp error against the fp32 reference on a slice of the queries, the ring's
  LSE merge over 4 K/V blocks with that kernel (what context parallelism runs on CUDA), and what "auto" picks.
- parity: our CogVideoX-2B, SD3-medium and Wan-1.3B transformers (full width, 2 layers, seeded random weights)
  against diffusers' on CUDA: bf16 outputs of both against diffusers' fp32 output (TF32 off), and ours against
  diffusers' in bf16.
- cogvideox: CogVideoX-2B, all 30 layers, 49 x 480 x 720 (13 x 60 x 90 latents, 17,550 video + 226 text tokens),
  batch 2 (classifier-free guidance), bf16: forward time and torch.cuda.max_memory_allocated for ours eager, ours
  compiled (regional, dit.compile), diffusers eager and diffusers compiled (regional), with the compile time and
  a check that timed forwards at other timesteps compile nothing more.
- wan: the same for Wan 2.1 1.3B at 81 x 480 x 832 (21 x 60 x 104 latents, 32,760 video tokens, 512 text), batch 1.
- vae: CogVideoX VAE decode of 13 x 60 x 90 latents (49 x 480 x 720), bf16: peak memory and time, ours and
  diffusers', and the output difference.
- wan_vae: the Wan 2.1 VAE (diffusers' default config) decoding 21 x 60 x 104 latents (81 x 480 x 832), bf16: the
  same for ours, ours in exact tiles of 240 x 416 (vae3d.wan_tiles) and diffusers'.

Nothing is downloaded: weights are seeded random, built on the GPU. Packages beyond the GPU image's (diffusers)
travel as wheels with the working tree (docs/gpu.md). `--tiny --device cpu` runs every section at toy sizes on the
CPU (the smoke test, tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python bench/gpu.py): the checkout, not an installed copy
    sys.path.insert(0, str(ROOT))

TOTAL_BUDGET_S = 480  # the "at most 8 minutes on one H100"
GPU_MEMORY_GIB = 78  # an H100's usable memory: the plan must fit it
JSON_NAME, LOG_NAME = "gpu.json", "gpu.log"


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: int  # its time box on one H100 (unused time passes on to the next sections)
    what: str


SECTIONS = (
    Section("env", 20, "versions, GPU, installed attention kernels"),
    Section("attention", 50, "each installed attention kernel: time, error, lse, ring merge"),
    Section("parity", 65, "bf16 parity with diffusers: CogVideoX-2B, SD3-medium, Wan-1.3B (2 layers each)"),
    Section("cogvideox", 125, "CogVideoX-2B full size, 49 x 480 x 720: ours / diffusers, eager / compiled"),
    Section("wan", 110, "Wan-1.3B full size, 81 x 480 x 832: ours / diffusers, eager / compiled"),
    Section("vae", 50, "CogVideoX VAE decode, 49 x 480 x 720: ours / diffusers"),
    Section("wan_vae", 60, "Wan 2.1 VAE decode, 81 x 480 x 832: ours, ours in exact tiles / diffusers"),
)


def sizes(tiny: bool) -> dict[str, Any]:
    """Every shape the run uses (tiny: toy sizes for the CPU smoke test)."""
    from dit.models.cogvideox import COGVIDEOX_2B
    from dit.models.mmdit import SD3_MEDIUM
    from dit.models.wan import WAN_2_1_1_3B

    if not tiny:
        return {
            "attention": {"cogvideox_2b": [2, 30, 226 + 13 * 30 * 45, 64], "wan_1_3b": [1, 12, 21 * 30 * 52, 128],
                          "reference_queries": 512, "warmup": 3, "reps": 10, "ring_blocks": 4},
            "parity": {
                "cogvideox": {"config": dict(COGVIDEOX_2B, num_layers=2), "latent": [2, 13, 16, 30, 44],
                              "text": [2, 226, 4096]},
                "sd3": {"config": dict(SD3_MEDIUM, num_layers=2), "latent": [2, 16, 128, 128], "text": [2, 333, 4096],
                        "pooled": [2, 2048]},
                "wan": {"config": dict(WAN_2_1_1_3B, num_layers=2), "latent": [1, 16, 21, 30, 52],
                        "text": [1, 512, 4096]},
            },
            "cogvideox": {"config": dict(COGVIDEOX_2B), "latent": [2, 13, 16, 60, 90], "text": [2, 226, 4096],
                          "warmup": 1, "reps": 3},
            "wan": {"config": dict(WAN_2_1_1_3B), "latent": [1, 16, 21, 60, 104], "text": [1, 512, 4096],
                    "warmup": 1, "reps": 3},
            "vae": {"config": {}, "latent": [1, 16, 13, 60, 90], "warm_latent": [1, 16, 3, 60, 90]},
            "wan_vae": {"config": {}, "latent": [1, 16, 21, 60, 104], "warm_latent": [1, 16, 2, 60, 104],
                        "exact_tile": [240, 416]},
        }
    cog = dict(COGVIDEOX_2B, num_attention_heads=2, attention_head_dim=16, time_embed_dim=8, text_embed_dim=16,
               num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=7)
    wan = dict(WAN_2_1_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16,
               in_channels=4, out_channels=4, num_layers=2)
    sd3 = dict(SD3_MEDIUM, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
               caption_projection_dim=32, pooled_projection_dim=16, in_channels=4, out_channels=4, sample_size=16,
               pos_embed_max_size=16)
    vae = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2)
    wan_vae = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                   latents_std=[1.0] * 4)
    return {
        "attention": {"cogvideox_2b": [2, 2, 40, 16], "wan_1_3b": [1, 2, 48, 32], "reference_queries": 16,
                      "warmup": 1, "reps": 2, "ring_blocks": 4},
        "parity": {
            "cogvideox": {"config": dict(cog, in_channels=4, out_channels=4), "latent": [2, 3, 4, 8, 8],
                          "text": [2, 7, 16]},
            "sd3": {"config": sd3, "latent": [2, 4, 16, 16], "text": [2, 7, 32], "pooled": [2, 16]},
            "wan": {"config": wan, "latent": [1, 4, 3, 8, 8], "text": [1, 7, 32]},
        },
        "cogvideox": {"config": dict(cog, in_channels=4, out_channels=4), "latent": [2, 3, 4, 8, 8], "text": [2, 7, 16],
                      "warmup": 1, "reps": 2},
        "wan": {"config": wan, "latent": [1, 4, 3, 8, 8], "text": [1, 7, 32], "warmup": 1, "reps": 2},
        "vae": {"config": vae, "latent": [1, 4, 3, 8, 8], "warm_latent": [1, 4, 2, 8, 8]},
        "wan_vae": {"config": wan_vae, "latent": [1, 4, 3, 8, 8], "warm_latent": [1, 4, 2, 8, 8], "exact_tile": [32, 32]},
    }


# ----------------------------------------------------------------------------------------------- recording


class Recorder:
    """A section's results, rewritten to its JSON file (atomically) after every figure, so that a section killed
    by its time box still leaves what it measured."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        write_json(self.path, self.data)
        print(f"[gpu] {key}: {json.dumps(value, default=str)[:400]}", flush=True)
        return value

    @contextmanager
    def row(self, key: str):
        """A measurement that may fail (out of memory, a kernel that refuses a shape): its error is recorded
        under `key` and the section goes on."""
        started = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            self.put(key, {"error": f"{type(e).__name__}: {str(e)[:500]}",
                           "seconds": round(time.perf_counter() - started, 1)})
            traceback.print_exc()
            _free()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- helpers


class Device:
    """Timing and memory on the run's device (CUDA: events of the stream and the allocator's peak; CPU: wall
    clock, no memory figure)."""

    def __init__(self, name: str):
        import torch

        self.name, self.torch = name, torch
        self.cuda = name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def times(self, fn: Callable[[], Any], *, warmup: int, reps: int) -> dict:
        """Median / min seconds of fn() over `reps` after `warmup` calls."""
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return {"median_s": round(statistics.median(out), 4), "min_s": round(min(out), 4),
                "all_s": [round(t, 4) for t in out]}

    def peak(self, fn: Callable[[], Any]) -> dict:
        """Peak allocated memory while fn() runs (CUDA): the absolute peak and its rise over what was allocated
        before (activations and workspace)."""
        if not self.cuda:
            fn()
            return {"peak_allocated_mb": None, "forward_extra_mb": None}
        torch = self.torch
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_allocated_mb": round(peak / 2**20, 1), "forward_extra_mb": round((peak - before) / 2**20, 1)}


def rel_error(x, ref) -> float:
    """||x - ref|| / ||ref|| in fp32."""
    x, ref = x.float(), ref.float()
    return float(f"{((x - ref).norm() / ref.norm().clamp_min(1e-30)).item():.3g}")


def randomize_(model, seed: int, std: float = 0.02):
    """Seeded N(0, std^2) weights generated on the model's device (fast on a GPU), every parameter."""
    import torch

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
    return model


def diffusers_class(kind: str):
    import diffusers

    return {"cogvideox": diffusers.CogVideoXTransformer3DModel, "sd3": diffusers.SD3Transformer2DModel,
            "wan": diffusers.WanTransformer3DModel}[kind]


def build_pair(kind: str, config: dict, device: str, dtype, seed: int = 0):
    """(diffusers' model, ours) with the same seeded weights, both cast to `dtype` the way from_pretrained casts
    (diffusers' `_keep_in_fp32_modules` stay fp32), in eval mode on `device`."""
    import torch

    from dit.convert import TRANSFORMER_CLASSES, cast_keeping_fp32, resolve

    with torch.device(device):
        ref = randomize_(diffusers_class(kind)(**config), seed)
        ours = resolve(TRANSFORMER_CLASSES[type(ref).__name__]).from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict())
    if hasattr(ours, "init_buffers"):
        ours.init_buffers()
    if dtype != torch.float32:
        ref, ours = cast_keeping_fp32(ref, dtype), cast_keeping_fp32(ours, dtype)
    return ref.eval().requires_grad_(False), ours.eval().requires_grad_(False)


def model_inputs(kind: str, spec: dict, device: str, dtype, seed: int = 1, t: int = 500) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    b = spec["latent"][0]
    kw = {"hidden_states": randn(spec["latent"]), "encoder_hidden_states": randn(spec["text"]),
          "timestep": torch.full((b,), t, device=device), "return_dict": False}
    if kind == "sd3":
        kw["pooled_projections"] = randn(spec["pooled"])
    return kw


def compile_regionally(model, backend: str) -> str:
    """Regional torch.compile of a model's blocks: ours through dit.compile; diffusers' through its
    compile_repeated_blocks where the class names `_repeated_blocks`, else each of its `_no_split_modules` blocks
    compiled the same way (nn.Module.compile). Returns how."""
    from dit.compile import compile_blocks

    if type(model).__module__.startswith("dit."):
        compile_blocks(model, {"backend": backend})
        return "dit.compile.compile_blocks"
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend)
        return "diffusers compile_repeated_blocks"
    names = set(model._no_split_modules or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names and "Embed" not in type(m).__name__]
    for block in blocks:
        block.compile(backend=backend)
    return f"nn.Module.compile on each of {len(blocks)} {'/'.join(sorted({type(b).__name__ for b in blocks}))}"


# -------------------------------------------------------------------------------------------------- sections


def section_env(rec: Recorder, args: argparse.Namespace) -> None:
    import importlib.metadata as md
    import platform

    import torch

    from dit.attention import BACKENDS, KERNELS, not_installed

    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "triton", "flash-attn", "flash_attn_3",
                "sageattention", "xformers", "einops", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    rec.put("versions", {"python": platform.python_version(), **versions})
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "nccl": str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    rec.put("device", info)
    rec.put("attention_kernels", {name: not_installed(name) or "installed" for name in BACKENDS if name in KERNELS})


def section_attention(rec: Recorder, args: argparse.Namespace) -> None:
    import torch

    from dit.attention import AUTO_ORDER, KERNELS, _auto, attention, attention_lse, not_installed
    from dit.parallel.attention import _merge_into

    dev = Device(args.device)
    spec = args.sizes["attention"]
    dtype = torch.bfloat16
    nq = spec["reference_queries"]
    rec.put("method", f"bf16 q/k/v ~ N(0, 1), shapes (B, H, L, D); reference: fp32 math on the first {nq} queries; "
                      f"time: median of {spec['reps']} after {spec['warmup']} warm-ups; ring: {spec['ring_blocks']} "
                      "K/V blocks merged by their lse (dit.parallel.attention._merge_into)")
    for shape_name in ("cogvideox_2b", "wan_1_3b"):
        shape = spec[shape_name]
        g = torch.Generator(device=args.device).manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g, device=args.device, dtype=dtype) for _ in range(3))
        qs = q[:, :, :nq]
        scale = shape[-1] ** -0.5
        logits = (qs.float() @ k.float().transpose(-2, -1)) * scale
        ref_lse = torch.logsumexp(logits, -1)
        ref = (logits - ref_lse[..., None]).exp() @ v.float()
        del logits
        results: dict[str, Any] = {"shape": shape, "auto_picks": _auto(q, k, v, None).name, "auto_order": AUTO_ORDER}
        for name, kernel in KERNELS.items():
            why = not_installed(name) or kernel.unsupported(q, k, v, None)
            if why is not None:
                results[name] = {"skipped": why}
                continue
            if name == "math":  # the full fp32 logits of these shapes would not fit
                results[name] = {"skipped": "the reference itself (full logits do not fit at this size)"}
                continue
            row: dict[str, Any] = {}
            results[name] = row
            with rec.row(f"{shape_name}.{name}"):
                row.update(dev.times(lambda: attention(q, k, v, backend=name), warmup=spec["warmup"],
                                     reps=spec["reps"]))
                b, h, length, d = shape
                row["tflops"] = (round(4 * b * h * length * length * d / row["median_s"] / 1e12, 1)
                                 if row["median_s"] > 0 else None)  # a toy shape can time below the rounding
                out = attention(qs, k, v, backend=name)
                row["out_rel_error"] = rel_error(out, ref)
                o2, lse = attention_lse(qs, k, v, backend=name)
                row["lse_out_rel_error"] = rel_error(o2, ref)
                row["lse_max_abs_error"] = float(f"{(lse.float() - ref_lse).abs().max().item():.3g}")
                acc = torch.zeros(qs.shape, dtype=torch.float32, device=q.device)
                acc_lse = torch.full(qs.shape[:3], float("-inf"), device=q.device)
                for kb, vb in zip(k.chunk(spec["ring_blocks"], 2), v.chunk(spec["ring_blocks"], 2)):
                    _merge_into(acc, acc_lse, qs, kb, vb, scale, qs.shape[2], name)
                row["ring_merge_rel_error"] = rel_error(acc, ref)
                row["ring_lse_max_abs_error"] = float(f"{(acc_lse - ref_lse).abs().max().item():.3g}")
            rec.put(shape_name, results)
        q = k = v = qs = ref = ref_lse = None  # this shape's tensors freed before the next
        _free()


def section_parity(rec: Recorder, args: argparse.Namespace) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rec.put("method", "seeded N(0, 0.02^2) weights; bf16 = cast as from_pretrained(torch_dtype=bf16) casts; errors "
                      "are ||a - b|| / ||b|| over the output; reference: diffusers in fp32 (TF32 off)")
    for kind, spec in args.sizes["parity"].items():
        with rec.row(kind):
            ref32, ours32 = build_pair(kind, spec["config"], args.device, torch.float32)
            with torch.inference_mode():
                kw = model_inputs(kind, spec, args.device, torch.float32)
                truth = ref32(**kw)[0]
                ours_fp32 = ours32(**kw)[0]
                row = {"fp32_ours_vs_diffusers": rel_error(ours_fp32, truth)}
                del ref32, ours32, ours_fp32
                _free()
                ref16, ours16 = build_pair(kind, spec["config"], args.device, torch.bfloat16)
                kw = model_inputs(kind, spec, args.device, torch.bfloat16)
                a, b = ours16(**kw)[0], ref16(**kw)[0]
                row.update(bf16_ours_vs_fp32=rel_error(a, truth), bf16_diffusers_vs_fp32=rel_error(b, truth),
                           bf16_ours_vs_diffusers_bf16=rel_error(a, b), finite=bool(torch.isfinite(a).all()))
            rec.put(kind, row)
            del ref16, ours16, a, b, truth
            _free()


def _forward_rows(rec: Recorder, args: argparse.Namespace, kind: str) -> None:
    """Ours and diffusers' at full size: eager (both), then compiled (ours, then diffusers'), one row each."""
    import torch

    from dit.compile import compiled_graphs

    spec = args.sizes[kind]
    dev = Device(args.device)
    rec.put("shape", {"latent": spec["latent"], "text": spec["text"], "dtype": "bf16"})
    t0 = time.perf_counter()
    ref, ours = build_pair(kind, spec["config"], args.device, torch.bfloat16)
    rec.put("build_s", round(time.perf_counter() - t0, 1))
    rec.put("parameters", sum(p.numel() for p in ours.parameters()))
    kw = model_inputs(kind, spec, args.device, torch.bfloat16)
    others = [model_inputs(kind, spec, args.device, torch.bfloat16, t=t) for t in (900, 100)]
    outputs = {}
    for impl, compiled in (("ours", False), ("diffusers", False), ("ours", True), ("diffusers", True)):
        name = f"{impl}_{'compiled' if compiled else 'eager'}"
        model = ours if impl == "ours" else ref
        with rec.row(name):
            row: dict[str, Any] = {}
            with torch.inference_mode():
                if compiled:
                    row["how"] = compile_regionally(model, args.compile_backend)
                    graphs = compiled_graphs()
                    dev.sync()
                    t1 = time.perf_counter()
                    model(**kw)
                    dev.sync()
                    row["first_call_s"] = round(time.perf_counter() - t1, 1)  # compile + one forward
                    row["graphs_compiled"] = compiled_graphs() - graphs
                    graphs = compiled_graphs()
                    for other in others:  # other timesteps: a denoising run's next steps
                        model(**other)
                    row["graphs_compiled_by_later_steps"] = compiled_graphs() - graphs
                row.update(dev.times(lambda: model(**kw), warmup=spec["warmup"], reps=spec["reps"]))
                row.update(dev.peak(lambda: model(**kw)))
                out = model(**kw)[0]
            outputs[name] = out
            if name != "ours_eager" and "ours_eager" in outputs:
                row["rel_error_vs_ours_eager"] = rel_error(out, outputs["ours_eager"])
            rec.put(name, row)
    ratios = {}
    for mode in ("eager", "compiled"):
        o, d = rec.data.get(f"ours_{mode}", {}), rec.data.get(f"diffusers_{mode}", {})
        for key in ("median_s", "peak_allocated_mb", "forward_extra_mb"):
            if o.get(key) and d.get(key):
                ratios[f"{mode}_{key}_ours_over_diffusers"] = round(o[key] / d[key], 3)
    rec.put("ratios", ratios)


def section_cogvideox(rec: Recorder, args: argparse.Namespace) -> None:
    _forward_rows(rec, args, "cogvideox")


def section_wan(rec: Recorder, args: argparse.Namespace) -> None:
    _forward_rows(rec, args, "wan")


VAE_CLASSES = {"vae": "AutoencoderKLCogVideoX", "wan_vae": "AutoencoderKLWan"}


def _decode_row(rec: Recorder, dev: Device, name: str, model, z, warm) -> Any:
    """One timed decode of z (after a warm-up decode of warm) with its peak memory, as row ``name``; the output."""
    import torch

    holder: dict[str, Any] = {}
    with rec.row(name), torch.inference_mode():
        model.decode(warm)
        row: dict[str, Any] = {}

        def run():
            holder["out"] = model.decode(z).sample

        dev.sync()
        t0 = time.perf_counter()
        row.update(dev.peak(run))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["output_shape"] = list(holder["out"].shape)
        rec.put(name, row)
    _free()
    return holder.get("out")


def _vae_rows(rec: Recorder, args: argparse.Namespace, kind: str) -> None:
    """A VAE decode, bf16: ours (and, with ``exact_tile`` in the spec, ours in exact tiles) and diffusers'."""
    import diffusers
    import torch

    import vae3d

    spec = args.sizes[kind]
    dev = Device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        with torch.device(args.device):
            ref = randomize_(getattr(diffusers, VAE_CLASSES[kind])(**spec["config"]), 0, 0.02)
        ref.save_pretrained(folder)
        ref = ref.to(torch.bfloat16).eval().requires_grad_(False)
        ours = vae3d.load_vae(folder, torch_dtype=torch.bfloat16, device=args.device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(spec["latent"], generator=g).to(args.device, torch.bfloat16)  # (B, C, F, H, W), as diffusers'
    warm = torch.randn(spec["warm_latent"], generator=g).to(args.device, torch.bfloat16)
    rec.put("shape", {"latent (B, C, F, H, W)": list(z.shape), "dtype": "bf16", "exact_tile": spec.get("exact_tile"),
                      "method": "one warm-up decode of a short latent, then one timed decode with its peak memory"})
    outs = {"ours": _decode_row(rec, dev, "ours", ours, z, warm)}
    if spec.get("exact_tile"):
        ours.enable_exact_tiling(*spec["exact_tile"])
        outs["ours_exact_tiles"] = _decode_row(rec, dev, "ours_exact_tiles", ours, z, warm)
        ours.disable_exact_tiling()
    outs["diffusers"] = _decode_row(rec, dev, "diffusers", ref, z, warm)
    d = rec.data.get("diffusers", {})
    ratios = {}
    for impl in [k for k in outs if k != "diffusers"]:
        if outs[impl] is not None and outs["diffusers"] is not None:
            rec.put(f"rel_error_{impl}_vs_diffusers", rel_error(outs[impl], outs["diffusers"]))
        o = rec.data.get(impl, {})
        if o.get("peak_allocated_mb") and d.get("peak_allocated_mb"):
            suffix = "" if impl == "ours" else "_" + impl.removeprefix("ours_")
            ratios[f"peak_ours_over_diffusers{suffix}"] = round(o["peak_allocated_mb"] / d["peak_allocated_mb"], 3)
            ratios[f"time_ours_over_diffusers{suffix}"] = round(o["seconds"] / d["seconds"], 3)
    if ratios:
        rec.put("ratios", ratios)


def section_vae(rec: Recorder, args: argparse.Namespace) -> None:
    _vae_rows(rec, args, "vae")


def section_wan_vae(rec: Recorder, args: argparse.Namespace) -> None:
    _vae_rows(rec, args, "wan_vae")


def section_selftest_sleep(rec: Recorder, args: argparse.Namespace) -> None:
    """Not in the plan: records a figure, then outlives any time box (the tests' check of partial results)."""
    rec.put("before_sleep", 1)
    time.sleep(600)


SECTION_FUNCTIONS: dict[str, Callable[[Recorder, argparse.Namespace], None]] = {
    "env": section_env, "attention": section_attention, "parity": section_parity, "cogvideox": section_cogvideox,
    "wan": section_wan, "vae": section_vae, "wan_vae": section_wan_vae, "_selftest_sleep": section_selftest_sleep,
}


# ------------------------------------------------------------------------------------------------ the plan


def plan(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The run as data, and the problems with it (none: it can run): sections and their time boxes within the
    total, every shape, the models built on the meta device (parameters, weight memory), and the memory each
    full-size section needs against the GPU's."""
    import torch

    problems: list[str] = []
    chosen = [s for s in SECTIONS if s.name in args.sections]
    total = sum(s.budget_s for s in chosen)
    if sum(s.budget_s for s in SECTIONS) > TOTAL_BUDGET_S:
        problems.append(f"the time boxes add up to more than {TOTAL_BUDGET_S} s, the issue's 8 minutes")
    if total * args.box_scale > args.budget:
        problems.append(f"the sections' time boxes add up to {total} s, over the budget of {args.budget} s")
    sz = sizes(args.tiny)
    models: dict[str, Any] = {}
    for kind in ("cogvideox", "wan"):
        spec = sz[kind]
        try:
            with torch.device("meta"):
                ref = diffusers_class(kind)(**spec["config"])
            from dit.convert import TRANSFORMER_CLASSES, resolve

            with torch.device("meta"):
                ours = resolve(TRANSFORMER_CLASSES[type(ref).__name__]).from_config(dict(ref.config))
            n_ref, n_ours = (sum(p.numel() for p in m.parameters()) for m in (ref, ours))
            if n_ref != n_ours:
                problems.append(f"{kind}: ours has {n_ours} parameters, diffusers' {n_ref}")
            b, *latent = spec["latent"]
            if kind == "cogvideox":
                f, _, h, w = latent
                p = spec["config"]["patch_size"]
                tokens = f * (h // p) * (w // p) + spec["text"][1]
            else:
                _, f, h, w = latent
                pt, ph, pw = spec["config"]["patch_size"]
                tokens = (f // pt) * (h // ph) * (w // pw)
            weights_gib = n_ref * 2 / 2**30  # bf16
            dim = spec["config"]["num_attention_heads"] * spec["config"]["attention_head_dim"]
            # Both models' bf16 weights, diffusers' fp32 copy while the pair is built, and a generous activation
            # bound: 16 hidden-size tensors of the whole sequence in fp32 (the MLP's 4x state among them).
            activations_gib = 16 * b * tokens * dim * 4 / 2**30
            need = 2 * weights_gib + 2 * weights_gib + activations_gib
            models[kind] = {"parameters": n_ref, "tokens": tokens, "batch": b, "weights_bf16_gib": round(weights_gib, 2),
                            "memory_bound_gib": round(need, 1)}
            if not args.tiny and need > GPU_MEMORY_GIB:
                problems.append(f"{kind}: about {need:.0f} GiB needed, over the {GPU_MEMORY_GIB} GiB of the GPU")
        except Exception as e:  # noqa: BLE001 - a plan that cannot build its models is the finding
            problems.append(f"{kind}: the models do not build: {type(e).__name__}: {e}")
    for kind, spec in sz["parity"].items():
        try:
            with torch.device("meta"):
                diffusers_class(kind)(**spec["config"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"parity {kind}: diffusers' model does not build: {type(e).__name__}: {e}")
    for kind, cls_name in VAE_CLASSES.items():
        try:
            import diffusers

            with torch.device("meta"):
                getattr(diffusers, cls_name)(**sz[kind]["config"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"{kind}: diffusers' {cls_name} does not build: {type(e).__name__}: {e}")
    from dit.attention import BACKENDS, KERNELS

    missing = [b for b in BACKENDS if b not in KERNELS and b != "auto"]
    if missing:
        problems.append(f"attention backends without a kernel: {missing}")
    return {
        "sections": [{"name": s.name, "budget_s": s.budget_s, "what": s.what} for s in chosen],
        "budget_s": args.budget, "sum_of_time_boxes_s": total, "device": args.device, "tiny": args.tiny,
        "compile_backend": args.compile_backend, "sizes": sz, "models": models,
    }, problems


# --------------------------------------------------------------------------------------------------- driver


def run_section_in_process(name: str, args: argparse.Namespace, work: Path) -> None:
    import torch

    rec = Recorder(work / f"{name}.json")
    args.sizes = sizes(args.tiny)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    SECTION_FUNCTIONS[name](rec, args)


def _child_argv(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(work), "--out",
            str(args.out), "--device", args.device, "--compile-backend", args.compile_backend]
    return argv + (["--tiny"] if args.tiny else [])


def run_sections(args: argparse.Namespace, report: dict, out_json: Path) -> None:
    """Each section in a fresh process within its time box; the report rewritten as results arrive."""
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    deadline = time.monotonic() + args.budget
    names = [n for n in args.sections]
    boxes = {s.name: s.budget_s for s in SECTIONS}
    boxes["_selftest_sleep"] = 10  # long enough to start and record, then cut off
    saved = 0.0  # time earlier sections left unused, passed on
    log = open(Path(args.out) / LOG_NAME, "a")
    try:
        for name in names:
            left = deadline - time.monotonic()
            box = min(boxes[name] * args.box_scale + saved, left)
            if left < 1:
                report["sections"][name] = {"status": "not run: the total budget is spent"}
                write_json(out_json, report)
                continue
            started = time.monotonic()
            log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
            log.flush()
            proc = subprocess.Popen(_child_argv(name, args, work), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = None
            while status is None:
                try:
                    code = proc.wait(timeout=2)
                    status = "ok" if code == 0 else f"error (exit code {code}; see {LOG_NAME})"
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started > box:
                        proc.kill()
                        proc.wait()
                        status = f"timeout after {box:.0f} s (figures so far kept)"
                _merge(report, name, work, status, started)
                write_json(out_json, report)
            elapsed = time.monotonic() - started
            saved = max(0.0, box - elapsed) if status == "ok" else 0.0
            print(f"[gpu] {name}: {status} in {elapsed:.0f} s", flush=True)
    finally:
        log.close()


def _merge(report: dict, name: str, work: Path, status: str | None, started: float) -> None:
    path = work / f"{name}.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # never: the file is replaced atomically
        data = {}
    report["sections"][name] = {"status": status or "running", "seconds": round(time.monotonic() - started, 1),
                                **data}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=f"folder for {JSON_NAME} and {LOG_NAME} (created)")
    parser.add_argument("--dry-run", action="store_true", help="validate the plan (no CUDA needed) and exit")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                        help="comma-separated sections to run, in order (default: all)")
    parser.add_argument("--budget", type=float,
                        help=f"total seconds (default: the sections' time boxes x --box-scale; {TOTAL_BUDGET_S} s for "
                             "all at scale 1)")
    parser.add_argument("--box-scale", type=float, default=1.0,
                        help="multiply every section's time box (e.g. 3 on a slower GPU)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this one section
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return args
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    known = [s.name for s in SECTIONS]
    unknown = [s for s in args.sections if s not in known and s != "_selftest_sleep"]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(known)}")
    if args.budget is None:
        args.budget = sum(s.budget_s for s in SECTIONS if s.name in args.sections) * args.box_scale
    if args.budget <= 0 or args.box_scale <= 0:
        parser.error("--budget and --box-scale must be positive")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: cuda or cpu")
    if args.device == "cpu" and not args.tiny and not args.dry_run:
        parser.error("--device cpu runs the toy sizes only: add --tiny (the full sizes are the GPU run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:  # a child process
        run_section_in_process(args.section, args, Path(args.work))
        return 0
    import torch

    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available here (torch {torch.__version__}): run with --dry-run to check the plan, or "
              "--tiny --device cpu for the smoke test", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    out_json = out / JSON_NAME
    the_plan, problems = plan(args)
    report: dict[str, Any] = {"bench": "bench/gpu.py", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "dry_run": args.dry_run, "plan": the_plan, "plan_problems": problems, "sections": {}}
    if args.dry_run:
        write_json(out_json, report)
        print(json.dumps({"plan_ok": not problems, "problems": problems,
                          "sections": [(s["name"], s["budget_s"]) for s in the_plan["sections"]],
                          "models": the_plan["models"]}, default=str))
        return 1 if problems else 0
    write_json(out_json, report)
    started = time.monotonic()
    run_sections(args, report, out_json)
    report["total_s"] = round(time.monotonic() - started, 1)
    write_json(out_json, report)
    print(json.dumps(summary(report), default=str))
    return 0


def summary(report: dict) -> dict:
    """The headline figures (the whole report is in the JSON file)."""
    s = report["sections"]
    head: dict[str, Any] = {"total_s": report.get("total_s"),
                            "status": {k: v.get("status") for k, v in s.items()}}
    for kind in ("cogvideox", "wan"):
        if "ratios" in s.get(kind, {}):
            head[f"{kind}_ratios"] = s[kind]["ratios"]
    if "parity" in s:
        head["parity"] = {k: v for k, v in s["parity"].items() if isinstance(v, dict)}
    for kind in VAE_CLASSES:
        if "ratios" in s.get(kind, {}):
            head[f"{kind}_ratios"] = s[kind]["ratios"]
    return head


if __name__ == "__main__":
    sys.exit(main())
