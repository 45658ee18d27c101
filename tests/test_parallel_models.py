"""Whole transformers under context parallelism equal the single-process model: outputs, input gradients and
weight gradients (averaged over ranks, as DDP does) within 1e-5, for Ulysses, ring and USP meshes and CFG
parallel (the batch of 2 split over two rank groups), with token counts the world size does not divide
(13 text tokens; 45 video / 20 image tokens) and head counts the Ulysses degree does not divide (3, 5, 6, 30)."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

pytestmark = pytest.mark.parallel


def _cogvideox(heads=4):
    from dit.models.cogvideox import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=10, sample_height=6, sample_frames=9, patch_size=2,
        max_text_seq_length=13, use_rotary_positional_embeddings=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = dict(hidden_states=torch.randn(2, 3, 4, 6, 10, generator=g),
                  encoder_hidden_states=torch.randn(2, 13, 16, generator=g), timestep=torch.tensor([500, 20]))
    return model, inputs, ("hidden_states", "encoder_hidden_states")


def _sd35(heads=4):
    from dit.models.mmdit import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=heads, joint_attention_dim=16, caption_projection_dim=16 * heads,
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


def _wan(heads=4):
    """Wan 2.1 I2V-shaped: cross-attention to whole text and image K/V on every rank (only the video is sharded)."""
    from dit.models.wan import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8,
                                  in_channels=12, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2,
                                  rope_max_seq_len=32, image_dim=20, added_kv_proj_dim=8 * heads)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = dict(hidden_states=torch.randn(2, 12, 3, 2, 10, generator=g),  # 15 video tokens
                  encoder_hidden_states=torch.randn(2, 13, 24, generator=g),
                  encoder_hidden_states_image=torch.randn(2, 5, 20, generator=g), timestep=torch.tensor([17, 803]))
    return model, inputs, ("hidden_states", "encoder_hidden_states")


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


def _check_models(rank, world, meshes, heads=4, builds=("cogvideox", "sd35"), inference=False):
    from dit.parallel import ContextParallelConfig

    for build in (globals()[f"_{b}"] for b in builds):
        model, inputs, grad_inputs = build(heads)
        ref_out = model(**inputs, return_dict=False)[0]
        out_grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(3))
        ref = _run(model, inputs, grad_inputs, out_grad)
        for i, mesh in enumerate(meshes):
            ring, ulysses, cfg, chunks = (*mesh, *(1, None)[len(mesh) - 2:])  # (ring, ulysses[, cfg[, head_chunks]])
            name = f"{build.__name__} heads={heads} ring={ring} ulysses={ulysses} cfg={cfg} head_chunks={chunks}"
            model.enable_parallelism(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, cfg_degree=cfg,
                                                           head_chunks=chunks))
            if i == 0:
                model.enable_gradient_checkpointing()  # shard sizes must survive the recomputation
            out, in_grads, w_grads = _run(model, inputs, grad_inputs, out_grad)
            model.disable_gradient_checkpointing()
            if inference:  # the no-grad path (the ring streams into the output; CogVideoX's low-memory blocks)
                with torch.no_grad():
                    _close(model(**inputs, return_dict=False)[0], ref[0], f"{name} no grad")
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


def _cfg_skip_layer_guidance(rank, world, folder):
    """SD3.5 skip-layer guidance under CFG parallel: its extra conditional call has no [uncond; cond] halves (one
    prompt: a batch of 1); the pipeline runs it whole on each cfg group, and the images are the single-process ones,
    for one prompt and for two."""
    from dit.parallel import ContextParallelConfig
    from dit.pipeline import DiTPipeline

    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    for prompt in ("a red circle moving left", ["a red circle moving left", "blue square"]):
        call = dict(prompt=prompt, negative_prompt=None, height=32, width=32, num_inference_steps=3,
                    guidance_scale=5.0, output_type="latent", **slg)
        pipe.transformer.disable_parallelism()
        ref = pipe(generator=torch.Generator().manual_seed(0), **call).images
        plain = pipe(generator=torch.Generator().manual_seed(0), **{**call, "skip_guidance_layers": None}).images
        assert (ref - plain).abs().max() > 1e-3  # the guidance term acts
        pipe.transformer.enable_parallelism(ContextParallelConfig(cfg_degree=2))
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
        assert (got - ref).abs().max() <= 1e-5, f"rank {rank}: max abs diff {(got - ref).abs().max():.3g}"
    pipe.transformer.disable_parallelism()


def test_cfg_parallel_sd35_skip_layer_guidance(tmp_path):
    from tests.tiny import tiny_sd3_pipeline

    tiny_sd3_pipeline(tmp_path, sd35=True)
    run_distributed(_cfg_skip_layer_guidance, 2, tmp_path)


def _uneven_heads(rank, world, cases):
    for heads, builds, meshes in cases:
        _check_models(rank, world, meshes, heads, builds, inference=True)


def test_uneven_heads_two_ranks():
    """3 heads over 2 Ulysses ranks (2 and 1 heads), CogVideoX and SD3.5 (with its image-only second attention)."""
    run_distributed(_uneven_heads, 2, [(3, ("cogvideox", "sd35"), [(1, 2), (1, 2, 1, 1)])])


def test_uneven_heads_four_ranks():
    """6 heads over 4 Ulysses ranks (2, 2, 1, 1); USP 2 x 2 and CFG 2 x Ulysses 2 with 5 heads (3, 2)."""
    run_distributed(_uneven_heads, 4, [(6, ("cogvideox", "sd35"), [(1, 4)]),
                                       (5, ("cogvideox", "sd35"), [(2, 2), (1, 2, 2)])])


def test_cogvideox_thirty_heads_four_ranks():
    """CogVideoX's 30 heads over 4 Ulysses ranks (8, 8, 7, 7): one head per rank per chunk, and all in one exchange."""
    run_distributed(_uneven_heads, 4, [(30, ("cogvideox",), [(1, 4), (1, 4, 1, 1)])])


def test_wan_uneven_heads_four_ranks():
    """Wan (self-attention sharded, cross-attention local): 6 heads over 4 Ulysses ranks; USP 2 x 2 and CFG 2 x
    Ulysses 2 with 5 heads; the text's gradient (whole on every rank) averaged over the ranks as well."""
    pytest.importorskip("dit.models.wan")
    run_distributed(_uneven_heads, 4, [(6, ("wan",), [(1, 4)]), (5, ("wan",), [(2, 2), (1, 2, 2)])])


def _heads_not_divisible(rank, world):
    from dit.parallel import ContextParallelConfig

    _check_models(rank, world, [(1, 3)], 4, ("cogvideox",))  # 4 heads over 3 Ulysses ranks: 2, 1, 1
    model, _, _ = _cogvideox(2)
    with pytest.raises(ValueError, match=r"ulysses_degree 3 is more than the 2 attention heads: .* would hold none and "
                                         r"sit idle .* ring_degree"):
        model.enable_parallelism(ContextParallelConfig(ulysses_degree=3))
    assert not model.is_parallel


def test_ulysses_degree_need_not_divide_heads():
    """A Ulysses degree that does not divide the head count gives uneven head shares and the single-process result;
    more Ulysses ranks than heads is refused (a rank would have no head to compute), pointing to the ring."""
    run_distributed(_heads_not_divisible, 3)


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
