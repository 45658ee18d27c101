"""Step caching (dit.cache): exact when it never skips, the right steps computed, a skipped step's arithmetic,
diffusers' FirstBlockCacheConfig / MagCacheConfig on our transformers equal to diffusers' on its own, the rest
refused, and under context / CFG parallelism the single-process cached result on every rank."""

import pytest
import torch

from dit.cache import FirstBlockCache, MagCache, MagCalibration, caching, parse_cache
from tests.distributed import run_distributed


def _cogvideox(seed: int = 0, heads: int = 4, layers: int = 3, rotary: bool = True):
    from dit.models.cogvideox import CogVideoXTransformer3DModel

    cfg = dict(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=16, num_layers=layers, sample_width=10, sample_height=6, sample_frames=9, patch_size=2,
               max_text_seq_length=13, use_rotary_positional_embeddings=rotary)
    model = CogVideoXTransformer3DModel(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), cfg


def _inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 3, 4, 6, 10, generator=g),
                encoder_hidden_states=torch.randn(batch, 13, 16, generator=g))


def _loop(model, inputs: dict, steps: int = 8, context: str | None = None) -> list[torch.Tensor]:
    """A denoising-like loop: x <- x - 0.1 * model(x, t) over decreasing t; the model output at every step."""
    x, outs = inputs["hidden_states"], []
    for i in range(steps):
        t = torch.full((x.shape[0],), 900 - 100 * i)
        kwargs = dict(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"], timestep=t,
                      return_dict=False)
        with torch.no_grad(), (model.cache_context(context) if context else _null()):
            out = model(**kwargs)[0]
        outs.append(out)
        x = x - 0.1 * out
    return outs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_threshold_zero_is_exactly_uncached():
    model, _ = _cogvideox()
    reference = _loop(model, _inputs())
    with caching([model], FirstBlockCache(0.0), 8) as (cache,):
        cached = _loop(model, _inputs())
    assert all(torch.equal(a, b) for a, b in zip(cached, reference))
    assert cache.report()["computed"] == 8 and cache.report()["blocks_run"] == 8 * 3


def test_report_warmup_final_and_the_skipped_step_arithmetic():
    model, _ = _cogvideox()
    with caching([model], FirstBlockCache(1e9, warmup=2, final=1), 6) as (cache,):
        cached = _loop(model, _inputs(), steps=6)
    report = cache.report()
    assert report["computed_steps"] == [0, 1, 5] and report["calls"] == 6
    assert report["blocks_run"] == 3 * 3 + 3 * 1  # skipped steps run the first block alone
    # a skipped step is the first block's output plus the residual the other blocks added at the last computed step
    reference = _loop(model, _inputs(), steps=6)
    assert torch.equal(cached[1], reference[1]) and not torch.allclose(cached[2], reference[2])


def test_mag_cache_skips_by_the_calibrated_ratios():
    model, _ = _cogvideox()
    with caching([model], MagCalibration(), 8) as (calibration,):
        reference = _loop(model, _inputs())
    ratios = calibration.report()["mag_ratios"]
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    with caching([model], MagCache(0.0, tuple(ratios)), 8) as (cache,):
        exact = _loop(model, _inputs())
    assert cache.report()["computed"] == 8 and all(torch.equal(a, b) for a, b in zip(exact, reference))
    with caching([model], MagCache(10.0, (1.0,) * 8, max_skip_steps=2, retention_ratio=0.25), 8) as (cache,):
        _loop(model, _inputs())
    # steps 0-1 retained (and computed), then at most 2 skipped in a row: skip, skip, compute, skip, skip, compute
    assert cache.report()["computed_steps"] == [0, 1, 4, 7]


def test_parse_cache_and_bad_input():
    assert parse_cache("fbc:0.1") == FirstBlockCache(0.1)
    assert parse_cache("fbc:0.05,warmup=2,final=1") == FirstBlockCache(0.05, 2, 1)
    assert parse_cache("mag:0.06,max_skip_steps=2", [1.0, 0.9]) == MagCache(0.06, (1.0, 0.9), 2)
    for spec, match in [("fbc", "KIND:THRESHOLD"), ("teacache:0.1", "KIND:THRESHOLD"), ("fbc:-1", ">= 0"),
                        ("fbc:0.1,k=3", "'k' is not one of warmup, final"), ("mag:0.1", "mag_ratios"),
                        ("fbc:0.1,warmup=1.5", "warmup=")]:
        with pytest.raises(ValueError, match=match):
            parse_cache(spec)
    with pytest.raises(ValueError, match="positive"):
        MagCache(0.1, (1.0, -1.0))


# ------------------------------------------------------------------------------------- diffusers' configs


def _diffusers_pair(tmp_path, family: str):
    """Our transformer and diffusers' on the same random weights, and a loop over one model's calls."""
    import dit

    if family == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel as Theirs

        ours, cfg = _cogvideox(rotary=False)  # diffusers' model takes its rotations from the pipeline
        theirs = Theirs(**cfg)
        theirs.load_state_dict(ours.state_dict())
        return ours, theirs.eval(), lambda m: _loop(m, _inputs(), context="cond")
    if family == "wan":
        from tests.tiny import tiny_wan_transformer

        theirs = tiny_wan_transformer(0)
        g = torch.Generator().manual_seed(3)
        inputs = dict(latents=torch.randn(2, 16, 3, 4, 6, generator=g), text=torch.randn(2, 7, 32, generator=g))
        call = lambda m, x, t: m(hidden_states=x, encoder_hidden_states=inputs["text"], timestep=t,  # noqa: E731
                                 return_dict=False)[0]
    else:
        from diffusers import SD3Transformer2DModel

        theirs = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                                       pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
        g = torch.Generator().manual_seed(3)
        inputs = dict(latents=torch.randn(2, 4, 8, 8, generator=g), text=torch.randn(2, 5, 16, generator=g),
                      pooled=torch.randn(2, 8, generator=g))
        call = lambda m, x, t: m(hidden_states=x, encoder_hidden_states=inputs["text"],  # noqa: E731
                                 pooled_projections=inputs["pooled"], timestep=t, return_dict=False)[0]
    theirs.save_pretrained(tmp_path / family)
    ours = dit.load_transformer(tmp_path / family).eval()

    def loop(model, steps: int = 8) -> list[torch.Tensor]:
        x, outs = inputs["latents"], []
        for i in range(steps):
            with torch.no_grad(), _context(model, "cond"):
                outs.append(call(model, x, torch.full((2,), 900.0 - 100 * i)))
            x = x - 0.1 * outs[-1]
        return outs

    return ours, theirs, loop


def _context(model, name: str):
    """model.cache_context(name); diffusers' SD3 transformer has no CacheMixin, so its hooks' context is set
    directly."""
    import contextlib

    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    if hasattr(model, "cache_context"):
        return model.cache_context(name)

    @contextlib.contextmanager
    def context():
        _set_cache_context(model, CacheContext(name))
        yield
        _set_cache_context(model, None)

    return context()


def _enable(model, config) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache, apply_mag_cache

    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
    else:
        (apply_first_block_cache if isinstance(config, FirstBlockCacheConfig) else apply_mag_cache)(model, config)
        HookRegistry.check_if_exists_or_initialize(model)._child_registries_cache = None  # the hooks just added


# diffusers' SD3 transformer has no enable_cache, and its First Block Cache hooks fail on SD3's last block (which
# returns no text tokens); ours runs it (test_sd3_first_block_cache_runs_where_diffusers_cannot).
@pytest.mark.parametrize("family, kind", [("cogvideox", "fbc"), ("cogvideox", "mag"), ("wan", "fbc"), ("wan", "mag"),
                                          ("sd3", "mag")])
def test_diffusers_cache_configs_give_diffusers_outputs(tmp_path, family, kind):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    ours, theirs, loop = _diffusers_pair(tmp_path, family)
    uncached = loop(theirs)
    for model in (ours, theirs):
        _enable(model, FirstBlockCacheConfig(threshold=0.3) if kind == "fbc" else MagCacheConfig(
            threshold=0.5, num_inference_steps=8, mag_ratios=[1.0] + [0.95] * 7, max_skip_steps=2))
    expected, got = loop(theirs), loop(ours)
    skipped = [i for i, (a, b) in enumerate(zip(expected, uncached)) if not torch.allclose(a, b, atol=1e-6)]
    assert skipped, "the config should skip some steps for this comparison to mean anything"
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), f"step {i}"
    ours.disable_cache()
    assert not ours.is_cache_enabled
    for a, b in zip(loop(ours), uncached):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


def test_sd3_first_block_cache_runs_where_diffusers_cannot(tmp_path):
    from diffusers.hooks import FirstBlockCacheConfig

    ours, theirs, loop = _diffusers_pair(tmp_path, "sd3")
    uncached = loop(ours)
    ours.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    cached = loop(ours)
    report = ours._cache_states["cond"].report()
    assert 0 < report["computed"] < 8
    first_skip = min(set(range(8)) - set(report["computed_steps"]))  # after it the trajectories part
    assert all(torch.equal(cached[i], uncached[i]) for i in range(first_skip))
    assert not torch.allclose(cached[first_skip], uncached[first_skip])


def test_diffusers_attention_caches_are_refused_not_silently_ignored():
    from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig

    model, _ = _cogvideox()
    for config in (PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500),
                   FasterCacheConfig(current_timestep_callback=lambda: 500)):
        with pytest.raises(ValueError, match="one attention function .* FirstBlockCacheConfig or MagCacheConfig"):
            model.enable_cache(config)
    assert not model.is_cache_enabled


# ------------------------------------------------------------------------------------- context parallelism


def _check_parallel(rank, world, meshes):
    from dit.parallel import ContextParallelConfig

    model, _ = _cogvideox(heads=6)
    config = FirstBlockCache(0.45)
    with caching([model], config, 8) as (cache,):
        reference = _loop(model, _inputs())
    computed = cache.report()["computed_steps"]
    assert 1 < len(computed) < 8, computed  # some steps skipped, some not: the decision is exercised
    for ring, ulysses, cfg in meshes:
        model.enable_parallelism(ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, cfg_degree=cfg))
        with caching([model], config, 8) as (cache,):
            outs = _loop(model, _inputs())
        model.disable_parallelism()
        assert cache.report()["computed_steps"] == computed, (ring, ulysses, cfg)
        for a, b in zip(outs, reference):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), (ring, ulysses, cfg)


@pytest.mark.parallel
def test_cached_two_ranks_equal_one_process():
    run_distributed(_check_parallel, 2, [(1, 2, 1), (2, 1, 1), (1, 1, 2)])


@pytest.mark.parallel
def test_cached_four_ranks_equal_one_process():
    run_distributed(_check_parallel, 4, [(1, 4, 1), (4, 1, 1), (2, 2, 1), (1, 2, 2)])


# ------------------------------------------------------------------------------------- pipelines and CLI


def _frames(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=6, guidance_scale=3.0, output_type="np", num_frames=9,
                generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_pipeline_cache_argument_and_report(tmp_path):
    from dit.pipeline import DiTPipeline
    from tests.tiny import tiny_cogvideox_pipeline

    tiny_cogvideox_pipeline(tmp_path / "cog")
    pipe = DiTPipeline.from_pretrained(tmp_path / "cog")
    pipe.set_progress_bar_config(disable=True)
    reference = _frames(pipe)
    assert pipe.pop_cache_reports() == []
    assert (_frames(pipe, cache=FirstBlockCache(0.0)) == reference).all()
    (report,) = pipe.pop_cache_reports()
    assert report["computed"] == report["calls"] == 6 and report["blocks_run"] == 12
    skipped = _frames(pipe, cache=FirstBlockCache(1e9, warmup=1, final=1))
    assert pipe.pop_cache_reports()[0]["computed_steps"] == [0, 5] and not (skipped == reference).all()
    # diffusers' idiom on our transformer, through our pipeline, is the same cache
    from diffusers.hooks import FirstBlockCacheConfig

    fbc = _frames(pipe, cache=FirstBlockCache(0.3))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    assert (_frames(pipe) == fbc).all()
    pipe.transformer.disable_cache()
    with pytest.raises(ValueError, match="diffusers' configs go to transformer.enable_cache"):
        _frames(pipe, cache=FirstBlockCacheConfig(threshold=0.3))


def test_two_experts_share_the_step_count(tmp_path):
    from dit.pipeline import DiTPipeline
    from tests.tiny import tiny_wan_pipeline

    tiny_wan_pipeline(tmp_path / "wan", two_experts=True)
    pipe = DiTPipeline.from_pretrained(tmp_path / "wan")
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", num_inference_steps=6, guidance_scale=3.0, output_type="np", num_frames=5, height=32,
         width=32, generator=torch.Generator().manual_seed(0), cache=FirstBlockCache(1e9, final=1))
    (report,) = pipe.pop_cache_reports()
    # each expert computes its first call (no residual of its own yet), the last step is always computed
    assert report["calls"] == 6 and report["computed_steps"][-1] == 5 and report["computed_steps"][0] == 0
    assert len(report["computed_steps"]) == 3


def test_cli_cache_recorded_and_bad_specs_refused_before_loading(tmp_path, capsys, monkeypatch):
    import json

    import dit.pipeline
    from dit.cli import main
    from tests.tiny import tiny_cogvideox_pipeline

    tiny_cogvideox_pipeline(tmp_path / "cog")
    args = ["generate", "a red circle", "--model", str(tmp_path / "cog"), "--steps", "4", "--frames", "9",
            "--height", "16", "--width", "16"]
    assert main([*args, "-o", str(tmp_path / "a.mp4"), "--cache", "fbc:1e9"]) == 0
    (sidecar,) = tmp_path.glob("a*.json")
    record = json.loads(sidecar.read_text())
    assert record["cache"] == "fbc:1e9" and record["cache_report"][0]["computed_steps"] == [0]
    capsys.readouterr()
    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for spec, match in [("fbc", "KIND:THRESHOLD"), ("mag:0.1", "mag_ratios"), ("fbc:0.1,k=2", "not one of")]:
        assert main([*args, "-o", str(tmp_path / "b.mp4"), "--cache", spec]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
