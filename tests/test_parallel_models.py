"""Whole transformers under context parallelism equal the single-process model: outputs, input gradients and
weight gradients (averaged over ranks, as DDP does) within 1e-5, for Ulysses, ring and USP meshes and CFG
parallel (the batch of 2 split over two rank groups), with token counts the world size does not divide
(13 text tokens; 45 video / 20 image tokens)."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

pytestmark = pytest.mark.parallel


def _cogvideox():
    from dit.models.cogvideox import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=10, sample_height=6, sample_frames=9, patch_size=2,
        max_text_seq_length=13, use_rotary_positional_embeddings=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = dict(hidden_states=torch.randn(2, 3, 4, 6, 10, generator=g),
                  encoder_hidden_states=torch.randn(2, 13, 16, generator=g), timestep=torch.tensor([500, 20]))
    return model, inputs, ("hidden_states", "encoder_hidden_states")


def _sd35():
    from dit.models.mmdit import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=64,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 10, generator=g),
                  encoder_hidden_states=torch.randn(2, 13, 16, generator=g),
                  pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([500.0, 20.0]))
    return model, inputs, ("hidden_states", "encoder_hidden_states", "pooled_projections")


def _run(model, inputs, grad_inputs, out_grad):
    model.zero_grad(set_to_none=True)
    leaves = {k: (v.clone().requires_grad_() if k in grad_inputs else v) for k, v in inputs.items()}
    out = model(**leaves, return_dict=False)[0]
    out.backward(out_grad)
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return out.detach(), {k: leaves[k].grad for k in grad_inputs}, grads


def _close(a, b, msg):
    """max |a - b| <= 1e-5 relative to the reference's scale (gradients reach ~50; fp32 sums in another order)."""
    err, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert err <= 1e-5 * scale, f"{msg}: max abs diff {err:.3g} at scale {scale:.3g}"


def _avg(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _check_models(rank, world, meshes):
    from dit.parallel import ContextParallelConfig

    for build in (_cogvideox, _sd35):
        model, inputs, grad_inputs = build()
        ref_out = model(**inputs, return_dict=False)[0]
        out_grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(3))
        ref = _run(model, inputs, grad_inputs, out_grad)
        for i, mesh in enumerate(meshes):
            ring, ulysses, cfg = (*mesh, 1)[:3]  # (ring, ulysses) or (ring, ulysses, cfg)
            name = f"{build.__name__} ring={ring} ulysses={ulysses} cfg={cfg}"
            model.enable_parallelism(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, cfg_degree=cfg))
            if i == 0:
                model.enable_gradient_checkpointing()  # shard sizes must survive the recomputation
            out, in_grads, w_grads = _run(model, inputs, grad_inputs, out_grad)
            model.disable_gradient_checkpointing()
            model.disable_parallelism()
            _close(out, ref[0], name)
            for k in grad_inputs:
                _close(_avg(in_grads[k]), ref[1][k], f"{name} d{k}")
            for n, grad in w_grads.items():
                _close(_avg(grad), ref[2][n], f"{name} d{n}")


def test_two_ranks():
    run_distributed(_check_models, 2, [(1, 2), (2, 1)])


def test_four_ranks():
    run_distributed(_check_models, 4, [(1, 4), (4, 1), (2, 2)])


def test_cfg_parallel_two_ranks():
    run_distributed(_check_models, 2, [(1, 1, 2)])


def test_cfg_parallel_with_ulysses_and_ring():
    run_distributed(_check_models, 4, [(1, 2, 2), (2, 1, 2)])


def _cfg_odd_batch(rank, world):
    from dit.parallel import ContextParallelConfig

    model, inputs, _ = _cogvideox()
    model.enable_parallelism(ContextParallelConfig(cfg_degree=2))
    assert model._cp.context.cfg_rank == rank and model._cp.context.rank == 0
    one = {k: v[:1] for k, v in inputs.items()}
    with pytest.raises(ValueError, match="cfg_degree 2 halves .* but the batch is 1"):
        model(**one)


def test_cfg_parallel_batch_not_divisible_is_a_clear_error():
    run_distributed(_cfg_odd_batch, 2)


def _cfg_pipeline(rank, world, folder):
    """Our CogVideoX pipeline with guidance: CFG parallel on 2 ranks gives the single-process frames."""
    from dit.parallel import ContextParallelConfig
    from dit.pipeline import DiTPipeline

    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle moving left", negative_prompt="blue square", num_frames=9, height=32, width=32,
                num_inference_steps=3, guidance_scale=6.0, output_type="np", max_sequence_length=16)
    ref = pipe(generator=torch.Generator().manual_seed(0), **call).frames
    pipe.transformer.enable_parallelism(ContextParallelConfig(cfg_degree=2))
    got = pipe(generator=torch.Generator().manual_seed(0), **call).frames
    assert abs(got - ref).max() <= 1e-5, f"rank {rank}: max abs diff {abs(got - ref).max():.3g}"


def test_cfg_parallel_pipeline_same_frames(tmp_path):
    from tests.tiny import tiny_cogvideox_pipeline

    tiny_cogvideox_pipeline(tmp_path, rotary=True)
    run_distributed(_cfg_pipeline, 2, tmp_path)


def _head_mismatch(rank, world):
    model, _, _ = _cogvideox()
    from dit.parallel import ContextParallelConfig

    with pytest.raises(ValueError, match="4 attention heads are not divisible by ulysses_degree 3"):
        model.enable_parallelism(ContextParallelConfig(ulysses_degree=3))


def test_ulysses_degree_must_divide_heads():
    run_distributed(_head_mismatch, 3)


def _dp_times_cp(rank, world):
    """4 processes = 2 data-parallel replicas x 2-way context parallelism: each replica computes its own input."""
    from dit.parallel import ContextParallelConfig

    model, inputs, grad_inputs = _cogvideox()
    replica = rank // 2
    inputs = {k: (v + replica if k == "hidden_states" else v) for k, v in inputs.items()}  # replicas differ
    ref = model(**inputs, return_dict=False)[0]
    model.enable_parallelism(ContextParallelConfig(ulysses_degree=2))
    assert model._cp.context.dp_size == 2 and model._cp.context.rank == rank % 2
    _close(model(**inputs, return_dict=False)[0], ref, f"dp x cp rank {rank}")


def test_data_parallel_times_context_parallel():
    run_distributed(_dp_times_cp, 4)
