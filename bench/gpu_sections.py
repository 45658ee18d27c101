"""The measurements of bench/gpu.py: one function per section (run in its own process by the driver there), each
writing its figures to a Recorder as they arrive, and the helpers they share (the device's timer and peak memory,
seeded random models, the transformer pairs and their inputs, regional compilation)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable


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
