"""Relay 2x (N steps at H x W, then M relay steps at 2H x 2W) against direct generation at 2H x 2W (N steps).

One CogVideoX-style transformer (random weights), our samplers, no CFG. Prints JSON: wall time of each way,
transformer FLOPs of each way (FLOPs of one forward at each size, counted by torch's FlopCounterMode on the meta
device, times the number of forwards), and the ratios. Run: `python -m bench.relay` (add `--quick` for a smoke run).

`--sd3-medium-layers K` benches the image case instead: an SD3 MMDiT at SD3-medium's width (24 heads x 64, 333
text tokens) with K of its 24 layers, relay from a 64x64 latent (512x512) to 128x128 (1024x1024) on the flow path
against direct generation at 128x128, SD3's 28 flow-Euler steps; the FLOPs ratio of the 24-layer model is added.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import samplers
from bench.common import emit, median_time
from dit.models.cogvideox import CogVideoXTransformer3DModel
from dit.sampling import denoise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, help="N, base and direct steps (default 50; 28 with --sd3-medium-layers)")
    parser.add_argument("--relay-steps", type=int, default=10, help="M, relay steps")
    parser.add_argument("--relay-start", type=int, default=500, help="T_r")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="base latent height = width (relay: twice that)")
    parser.add_argument("--cogvideox-2b-layers", type=int, metavar="K",
                        help="CogVideoX-2B's own layer shape (30 heads x 64, 226 text tokens of 4096) with K of its 30 "
                             "layers, at 13 x 30 x 44 latents relayed to 13 x 60 x 88 (240x352 -> 49 x 480 x 704); "
                             "overrides --heads/--head-dim/--layers/--size")
    parser.add_argument("--sd3-medium-layers", type=int, metavar="K",
                        help="SD3-medium's layer shape (24 heads x 64, 333 text tokens) with K of its 24 layers: 64x64 "
                             "latents relayed to 128x128 against direct 128x128 (512 -> 1024 pixels), --steps "
                             "defaulting to SD3's 28; overrides --heads/--head-dim/--layers/--size")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each way (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps, one run (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.size < 2 or args.size % 2:
        parser.error(f"--size {args.size}: the base latent must divide by the patch size 2 (e.g. {max(2, args.size + 1)})")
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: give at least 1")
    if args.cogvideox_2b_layers is not None and not 1 <= args.cogvideox_2b_layers <= 30:
        parser.error(f"--cogvideox-2b-layers {args.cogvideox_2b_layers}: give 1 to 30 (of its 30 layers)")
    if args.cogvideox_2b_layers is not None and args.quick:
        parser.error("--quick and --cogvideox-2b-layers: choose one (the quick smoke run has its own tiny shapes)")
    if args.sd3_medium_layers is not None and not 1 <= args.sd3_medium_layers <= 24:
        parser.error(f"--sd3-medium-layers {args.sd3_medium_layers}: give 1 to 24 (of its 24 layers)")
    if args.sd3_medium_layers is not None and (args.quick or args.cogvideox_2b_layers is not None):
        parser.error("--sd3-medium-layers: give it alone, without --quick or --cogvideox-2b-layers")
    for name in ("steps", "relay_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.sd3_medium_layers is not None:
        emit(sd3_medium_record(args))
        return
    args.steps = 50 if args.steps is None else args.steps
    # What decides the ratio is how attention (quadratic in tokens) weighs against the linear layers (quadratic in
    # width): CogVideoX-2B at 49x480x704 has ~8.9 relay tokens per unit of width (17,160 / 1920); `--heads 2`
    # (width 128, 1280 relay tokens: 10 per unit) has about its proportions at a size this CPU runs.
    steps, relay_steps = (4, 2) if args.quick else (args.steps, args.relay_steps)
    if args.cogvideox_2b_layers is not None:
        from dit.models.cogvideox import COGVIDEOX_2B

        # Every layer of the 2B model has this shape, so the ratio of K layers is the 30-layer model's up to the
        # embeddings and output projection (linear in tokens: with fewer layers they weigh more and push the
        # ratio up, towards 0.2 + 0.25).
        config = dict(COGVIDEOX_2B, num_layers=args.cogvideox_2b_layers)
        frames, height, width = 13, 30, 44  # base latent (F', H', W')
    else:
        heads, head_dim, layers = (2, 16, 1) if args.quick else (args.heads, args.head_dim, args.layers)
        frames, height, width = (2, 8, 8) if args.quick else (5, args.size, args.size)
        config = dict(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
            time_embed_dim=128, text_embed_dim=128, num_layers=layers, sample_width=width, sample_height=height,
            sample_frames=4 * frames - 3, patch_size=2, max_text_seq_length=32, use_rotary_positional_embeddings=True,
        )
    model = CogVideoXTransformer3DModel(**config).eval()
    text = torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"])
    spec = samplers.from_diffusers_config({"_class_name": "CogVideoXDDIMScheduler", "prediction_type": "v_prediction",
                                           "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, steps)
    path = samplers.TrainPath.vp(samplers.rescale_zero_terminal_snr(samplers.snr_shift(
        samplers.alphas_cumprod_from_betas(samplers.ddpm_betas()), 3.0)))
    relay = samplers.relay_spec(path, args.relay_start, relay_steps, "v", block_size=2)

    def model_fn(x, t):
        return model(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(x.shape[0]), return_dict=False)[0]

    lo = torch.randn(1, frames, 16, height, width)  # (B, F', C, H', W'): CogVideoX's latent layout
    hi = torch.randn(1, frames, 16, 2 * height, 2 * width)

    full_size = None if args.quick else full_size_flops_ratio(steps, relay_steps)
    # Counted outside inference mode: there the model takes its in-place low-memory path, which packs weights and
    # cannot run on the meta device.
    f_lo, f_hi = meta_forward_flops(config, lo.shape, text.shape), meta_forward_flops(config, hi.shape, text.shape)
    with torch.inference_mode():
        reps = 1 if args.quick else args.reps  # one run of each varies by ~10% on a shared CPU
        t_direct, t_relay = _relay_and_direct(model_fn, lo, hi, spec, relay, reps)
    flops_direct, flops_relay = steps * f_hi, steps * f_lo + relay_steps * f_hi
    emit({
        "bench": "relay", "model": {"layers": config["num_layers"], "heads": config["num_attention_heads"],
                                    "head_dim": config["attention_head_dim"], "text_tokens": text.shape[1],
                                    "cogvideox_2b_layer_shape": args.cogvideox_2b_layers is not None},
        "base_latent": [frames, height, width], "relay_latent": [frames, 2 * height, 2 * width],
        "tokens": {"base": frames * (height // 2) * (width // 2), "relay": frames * height * width}, "reps": reps,
        "N": steps, "M": relay_steps, "T_r": args.relay_start,
        "direct": {"seconds": round(t_direct, 3), "tflops": round(flops_direct / 1e12, 4)},
        "relay": {"seconds": round(t_relay, 3), "tflops": round(flops_relay / 1e12, 4)},
        "time_ratio": round(t_relay / t_direct, 3), "flops_ratio": round(flops_relay / flops_direct, 3),
        "threads": args.threads, "cogvideox_2b_49x480x704_from_240x352": full_size,
    })


def meta_forward_flops(config: dict, latent_shape: tuple, text_shape: tuple) -> int:
    """FLOPs of one transformer forward, counted on the meta device (no weights, no compute). On the meta device
    FlopCounterMode counts scaled_dot_product_attention; on CPU it counts 0 for it (torch 2.13: the fused CPU
    kernel has no FLOP formula), which would leave attention, the part relay saves most on, out of the ratio."""
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**config).eval()
        with FlopCounterMode(display=False) as counter:
            model(hidden_states=torch.empty(latent_shape), encoder_hidden_states=torch.empty(text_shape),
                  timestep=torch.tensor([500]), return_dict=False)
    return counter.get_total_flops()


def full_size_flops_ratio(steps: int, relay_steps: int) -> dict:
    """FLOPs of CogVideoX-2B at 49 x 480 x 704 (13 x 60 x 88 latents, 226 text tokens), direct against relay 2x
    from 240 x 352: where attention dominates."""
    from dit.models.cogvideox import COGVIDEOX_2B

    # Width 45 does not divide by the patch; 44 is the nearest.
    lo, hi = (meta_forward_flops(COGVIDEOX_2B, (1, 13, 16, h, w), (1, 226, 4096)) for h, w in ((30, 44), (60, 88)))
    return {"tflops_per_forward": {"240x352": round(lo / 1e12, 2), "480x704": round(hi / 1e12, 2)},
            "flops_ratio": round((steps * lo + relay_steps * hi) / (steps * hi), 3)}


# SD3-medium's text: 77 CLIP tokens and 256 T5 tokens of 4096, and the two CLIPs' pooled 768 + 1280.
SD3_TEXT_TOKENS, SD3_SCHEDULER = 77 + 256, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


def sd3_forward_flops(config: dict, latent_shape: tuple) -> int:
    """FLOPs of one SD3 MMDiT forward at `latent_shape` (B, C, H, W), counted on the meta device (as
    meta_forward_flops, for attention to be counted)."""
    from dit.models.mmdit import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config).eval()
        b = latent_shape[0]
        with FlopCounterMode(display=False) as counter:
            model(hidden_states=torch.empty(latent_shape),
                  encoder_hidden_states=torch.empty(b, SD3_TEXT_TOKENS, config["joint_attention_dim"]),
                  pooled_projections=torch.empty(b, config["pooled_projection_dim"]), timestep=torch.tensor([500.0]),
                  return_dict=False)
    return counter.get_total_flops()


def _relay_and_direct(model_fn: Callable, lo: torch.Tensor, hi: torch.Tensor, spec: samplers.SamplerSpec,
                      relay: samplers.SamplerSpec, reps: int) -> tuple[float, float]:
    """Median seconds of direct generation at hi's size, and of base generation at lo's size plus the relay stage."""
    def direct():
        return denoise(model_fn, hi, spec)

    def relayed():
        base = denoise(model_fn, lo, spec)
        return denoise(model_fn, samplers.upsample(base, 2), relay, generator=torch.Generator().manual_seed(0))

    return median_time(direct, warmup=0, reps=reps), median_time(relayed, warmup=0, reps=reps)


def sd3_medium_record(args: argparse.Namespace) -> dict:
    """Relay 2x against direct for SD3-medium's layer shape with K layers (random weights, no CFG): 64x64 latents
    (512x512) relayed to 128x128 (1024x1024), on SD3's flow path (shift 3), block noise of block size 2."""
    from dit.models.mmdit import SD3_MEDIUM, SD3Transformer2DModel

    config = dict(SD3_MEDIUM, num_layers=args.sd3_medium_layers)
    steps, relay_steps = 28 if args.steps is None else args.steps, args.relay_steps
    model = SD3Transformer2DModel(**config).eval()
    text = torch.randn(1, SD3_TEXT_TOKENS, config["joint_attention_dim"])
    pooled = torch.randn(1, config["pooled_projection_dim"])

    def model_fn(x, t):
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t.float().expand(x.shape[0]), return_dict=False)[0]

    spec = samplers.from_diffusers_config(SD3_SCHEDULER, steps)
    relay = samplers.relay_spec(samplers.train_path_from_config(SD3_SCHEDULER), args.relay_start, relay_steps, "flow",
                                block_size=2)
    lo, hi = torch.randn(1, 16, 64, 64), torch.randn(1, 16, 128, 128)
    with torch.inference_mode():
        t_direct, t_relay = _relay_and_direct(model_fn, lo, hi, spec, relay, args.reps)
    f_lo, f_hi = (sd3_forward_flops(config, z.shape) for z in (lo, hi))
    full_lo, full_hi = (sd3_forward_flops(SD3_MEDIUM, z.shape) for z in (lo, hi))
    flops_direct, flops_relay = steps * f_hi, steps * f_lo + relay_steps * f_hi
    return {
        "bench": "relay", "model": {"family": "sd3", "layers": config["num_layers"],
                                    "heads": config["num_attention_heads"], "head_dim": config["attention_head_dim"],
                                    "text_tokens": SD3_TEXT_TOKENS, "sd3_medium_layer_shape": True},
        "base_latent": [64, 64], "relay_latent": [128, 128], "tokens": {"base": 32 * 32, "relay": 64 * 64},
        "reps": args.reps, "N": steps, "M": relay_steps, "T_r": args.relay_start,
        "direct": {"seconds": round(t_direct, 3), "tflops": round(flops_direct / 1e12, 4)},
        "relay": {"seconds": round(t_relay, 3), "tflops": round(flops_relay / 1e12, 4)},
        "time_ratio": round(t_relay / t_direct, 3), "flops_ratio": round(flops_relay / flops_direct, 3),
        "threads": args.threads,
        "sd3_medium_1024_from_512": {"tflops_per_forward": {"512": round(full_lo / 1e12, 2),
                                                            "1024": round(full_hi / 1e12, 2)},
                                     "flops_ratio": round((steps * full_lo + relay_steps * full_hi)
                                                          / (steps * full_hi), 3)},
    }


if __name__ == "__main__":
    main()
