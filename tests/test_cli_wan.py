"""`dit generate` on tiny diffusers WanPipeline folders (Wan 2.1, Wan 2.2's two experts, TI2V-5B): the frames of
our pipeline called directly, sidecars and resume, the family's defaults, and every refusal one line before any
weights load."""

import json
import os
import shutil
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import dit.estimate
import dit.pipeline
from dit import DiTPipeline
from dit.cli import build_parser, main
from dit.generate import _plan
from dit.pipeline.wan import WanDiTPipeline
from tests.tiny import tiny_wan_pipeline

PROMPT, NEGATIVE = "a red circle moving right", "blue"
ARGS = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "4", "--guidance", "4.0",
        "--negative-prompt", NEGATIVE]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """{"wan21": one expert, "wan22": two experts (boundary_ratio 0.875), "ti2v": expand_timesteps, VAE x16}."""
    root = tmp_path_factory.mktemp("tiny-wan")
    for name, kw in (("wan21", {}), ("wan22", {"two_experts": True}), ("ti2v", {"ti2v": True})):
        tiny_wan_pipeline(root / name, **kw)
    return {name: root / name for name in ("wan21", "wan22", "ti2v")}


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if any weights are loaded (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", refuse)


def _error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _direct(folder, seed: int, **kw) -> np.ndarray:
    """Our pipeline called directly, as the command line calls it (fp32, a CPU generator): frames (F, H, W, 3)."""
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=9, num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np", **kw).frames[0]


def _read_png_folder(path) -> np.ndarray:
    return np.stack([iio.imread(p) for p in sorted(path.iterdir())])


@pytest.mark.parametrize("name,size,extra", [("wan21", 32, []), ("wan22", 32, []), ("ti2v", 64, []),
                                             ("wan21", 32, ["--solver", "euler"])])
def test_the_cli_writes_the_pipelines_frames_and_a_rerun_skips(wan, tmp_path, capsys, monkeypatch, name, size,
                                                                extra):
    out = tmp_path / "clip.png"
    argv = ["generate", PROMPT, "-o", str(out), "--model", str(wan[name]), "--seed", "3", *ARGS,
            "--height", str(size), "--width", str(size), *extra]
    assert main(argv) == 0
    written = _read_png_folder(out)
    direct = _direct(wan[name], 3, height=size, width=size, **({"solver": "euler"} if extra else {}))
    assert written.shape == direct.shape == (9, size, size, 3)
    assert np.abs(written.astype(np.float64) - direct * 255).max() <= 1  # equal within 8-bit rounding
    side = json.loads((tmp_path / "clip.png.json").read_text())
    assert (side["model"], side["seed"], side["steps"], side["guidance"]) == (str(wan[name]), 3, 4, 4.0)
    assert (side["height"], side["width"], side["frames"], side["fps"]) == (size, size, 9, 16)
    assert side["negative_prompt"] == NEGATIVE and side["solver"] == (extra[1] if extra else None)
    mtime = (out / "frame_0000.png").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(argv) == 0  # the same request again: skipped from its sidecar, no weights loaded
    assert "skip (exists)" in capsys.readouterr().err and (out / "frame_0000.png").stat().st_mtime_ns == mtime


def test_relay_2_doubles_height_and_width(wan, tmp_path):
    """--relay 2 on Wan's flow path (the base transformer as the relay stage): the 32x32 request is written at
    64x64, the frames of our pipeline called with relay=2."""
    out = tmp_path / "relay.png"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(wan["wan21"]), "--seed", "3", *ARGS,
                 "--relay", "2"]) == 0
    written = _read_png_folder(out)
    direct = _direct(wan["wan21"], 3, height=32, width=32, relay=2)
    assert written.shape == direct.shape == (9, 64, 64, 3)
    assert np.abs(written.astype(np.float64) - direct * 255).max() <= 1  # equal within 8-bit rounding
    side = json.loads((tmp_path / "relay.png.json").read_text())
    assert (side["relay"], side["height"], side["width"]) == (2, 32, 32)  # the request; relay makes it 2x


@pytest.mark.parametrize("name,size,tile", [("wan21", 32, "16"), ("ti2v", 64, "32x48")])
def test_vae_tile_writes_the_untiled_frames(wan, tmp_path, monkeypatch, name, size, tile):
    """--vae-tile: exact tiles (vae3d.wan_tiles) give the frames of the untiled decode (2 x 2 tiles)."""
    import vae3d.wan_tiles

    plans, plan_tiles = [], vae3d.wan_tiles.plan_tiles
    monkeypatch.setattr(vae3d.wan_tiles, "plan_tiles", lambda *a: plans.extend(plan_tiles(*a)) or plans)
    out = tmp_path / "tiled.png"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(wan[name]), "--seed", "3", *ARGS,
                 "--height", str(size), "--width", str(size), "--vae-tile", tile]) == 0
    written = _read_png_folder(out)
    direct = _direct(wan[name], 3, height=size, width=size)
    assert written.shape == direct.shape == (9, size, size, 3)
    assert np.abs(written.astype(np.float64) - direct * 255).max() <= 1  # equal within 8-bit rounding
    assert "vae_tile" not in json.loads((tmp_path / "tiled.png.json").read_text())  # the same frames: not a setting
    assert len(plans) == 4


def test_vae_tile_under_torchrun_is_refused_before_any_weights_load(wan, tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the check comes before any process group
    argv = ["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", str(wan["wan21"]), *ARGS,
            "--ulysses-degree", "2", "--vae-tile", "16"]
    assert main(argv) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "--vae-tile decodes in one process" in lines[0], lines


def test_defaults_are_wan_pipelines_or_the_folders_generation_config(wan, tmp_path):
    def plan(folder):
        args = build_parser().parse_args(["generate", PROMPT, "--model", str(folder), "-o", str(tmp_path / "x.mp4")])
        _, [(request, _)], settings = _plan(args)
        return (request.height, request.width, request.frames), settings

    sizes, settings = plan(wan["wan21"])
    assert sizes == (480, 832, 81)  # diffusers' WanPipeline defaults
    assert (settings["steps"], settings["guidance"], settings["fps"]) == (50, 5.0, 16)
    assert WanDiTPipeline.check_folder_request(wan["ti2v"], None, None, None) == (480, 832, 81)
    folder = tmp_path / "with-config"
    shutil.copytree(wan["wan22"], folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"height": 64, "width": 96, "num_frames": 17, "num_inference_steps": 40, "guidance_scale": 3.0, "fps": 24}))
    sizes, settings = plan(folder)
    assert sizes == (64, 96, 17) and (settings["steps"], settings["guidance"], settings["fps"]) == (40, 3.0, 24)


@pytest.mark.parametrize("name,argv,match", [
    ("wan21", ["--height", "36"], "height 36 must be divisible by 16; nearest valid: 32 or 48"),
    ("wan22", ["--frames", "8"], "num_frames 8 must be 1 + 4n for this VAE; nearest valid: 5 or 9"),
    ("ti2v", ["--height", "48"], "height 48 must be divisible by 32; nearest valid: 32 or 64"),  # VAE x16, patch 2
    ("wan22", ["--solver", "banana"], "unknown solver 'banana'"),
    ("wan21", ["--vae-tile", "12x16"], "--vae-tile 12x16: the tile height 12 is not a multiple of the VAE's spatial "
                                       "compression 8; nearest valid: 8 or 16"),
    ("ti2v", ["--vae-tile", "24"], "the tile height 24 is not a multiple of the VAE's spatial compression 16; "
                                   "nearest valid: 16 or 32"),  # VAE x8, patch 2
])
def test_bad_requests_are_one_line_before_any_weights_load(wan, tmp_path, capsys, no_load, name, argv, match):
    out = tmp_path / "new" / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(wan[name]), *ARGS, *argv]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("dit: error: ") and match in lines[0], lines
    assert not (tmp_path / "new").exists()


def test_a_request_that_cannot_fit_is_refused_with_what_fits(wan, tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setattr(dit.estimate, "available_bytes", lambda device: 16 * dit.estimate.GiB)
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", str(wan["wan22"]), *ARGS,
                 "--frames", "1000001"]) == 2
    [line] = _error_lines(capsys)
    assert "1000001 frames needs about" in line and "16.0 GiB is free" in line and "--force" in line
    assert "what fits: --frames" in line and not (tmp_path / "x.mp4").exists()


@pytest.mark.parallel
def test_generate_under_torchrun_with_context_parallelism_equals_single_process(wan, tmp_path):
    """Both experts run context parallel (Ulysses over the 2 heads); our Wan VAE's decode is split over the 2 ranks
    too (9 frames = 3 latent frames: [2, 1])."""
    common = ["--model", str(wan["wan22"]), "--seed", "5", *ARGS]
    single = tmp_path / "single.png"
    assert main(["generate", PROMPT, "-o", str(single), *common]) == 0
    par = tmp_path / "par.png"
    from distributed import _free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "dit", "generate", PROMPT, "-o", str(par),
                        "--ulysses-degree", "2", *common], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _read_png_folder(single), _read_png_folder(par)
    assert a.shape == b.shape == (9, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same frames (8-bit rounding)
    assert json.loads((tmp_path / "par.png.json").read_text())["context_parallel"] == [1, 2]


def _time_sharded_frames(rank, world, cases):
    """Each case (folder, image-to-video, size, expected frames file) run as `dit generate` runs it under torchrun
    (the VAE time-sharded by _shard_vae_decode): the decode goes through vae3d.parallel, the frames are one
    process's."""
    import vae3d.parallel
    from dit.generate import _shard_vae_decode
    from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline
    from tests.tiny import tiny_picture

    sharded = []
    decode = vae3d.parallel.decode
    vae3d.parallel.decode = lambda vae, z: sharded.append(z.shape[2]) or decode(vae, z)
    for folder, image, size, expected in cases:
        pipe = (WanImageToVideoDiTPipeline if image else DiTPipeline).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _shard_vae_decode(pipe, 9)
        assert type(pipe.vae).__name__ == "WanVAE3D" and pipe.vae.is_parallel
        frames = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=9,
                      num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                      output_type="np", **({"image": tiny_picture(0)} if image else {})).frames[0]
        np.testing.assert_allclose(frames, np.load(expected), atol=1e-5, rtol=0)
    assert sharded == [3] * len(cases)  # every decode (3 latent frames) ran sharded


@pytest.mark.parallel
def test_wan_vae_decode_time_sharded_on_two_ranks_equals_one_process(wan, i2v, tmp_path):
    """Our Wan VAE shards its decode over the ranks as CogVideoX's does (2 gloo processes, 3 latent frames split
    [2, 1]): Wan 2.1 text-to-video, Wan 2.1 image-to-video (its 9-frame condition encoded sharded too) and TI2V-5B
    from an image (its one first frame cannot be split: encoded whole on each rank) give one process's frames."""
    from distributed import run_distributed

    from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline
    from tests.tiny import tiny_picture

    cases = []
    for name, folder, image, size in (("wan21", wan["wan21"], False, 32), ("wan21-i2v", i2v["wan21-i2v"], True, 32),
                                      ("ti2v", wan["ti2v"], True, 64)):
        pipe = (WanImageToVideoDiTPipeline if image else DiTPipeline).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=9,
                      num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                      output_type="np", **({"image": tiny_picture(0)} if image else {})).frames[0]
        np.save(tmp_path / f"{name}.npy", frames)
        cases.append((str(folder), image, size, str(tmp_path / f"{name}.npy")))
    run_distributed(_time_sharded_frames, 2, cases)


# -- image-to-video (--image) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """{"wan21-i2v": CLIP image encoder + image cross-attention, "wan22-i2v": two experts, no encoder} and a
    first frame written as PNG."""
    from tests.tiny import tiny_picture, tiny_wan_i2v_pipeline

    root = tmp_path_factory.mktemp("tiny-wan-i2v")
    tiny_wan_i2v_pipeline(root / "wan21-i2v")
    tiny_wan_i2v_pipeline(root / "wan22-i2v", two_experts=True)
    tiny_picture(0).save(root / "first.png")
    return {"wan21-i2v": root / "wan21-i2v", "wan22-i2v": root / "wan22-i2v", "image": root / "first.png"}


@pytest.mark.parametrize("name,size", [("wan21-i2v", 32), ("wan22-i2v", 32), ("ti2v", 64)])
def test_the_cli_writes_the_i2v_pipelines_frames_and_a_rerun_skips(wan, i2v, tmp_path, capsys, monkeypatch, name,
                                                                    size):
    import hashlib

    import PIL.Image

    from dit.pipeline.wan_i2v import WanImageToVideoDiTPipeline

    folder = i2v.get(name) or wan[name]  # TI2V-5B's WanPipeline folder runs from an image too
    out = tmp_path / "clip.png"
    argv = ["generate", PROMPT, "-o", str(out), "--model", str(folder), "--seed", "3", *ARGS,
            "--height", str(size), "--width", str(size), "--image", str(i2v["image"])]
    assert main(argv) == 0
    pipe = WanImageToVideoDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(image=PIL.Image.open(i2v["image"]).convert("RGB"), prompt=PROMPT, negative_prompt=NEGATIVE,
                  height=size, width=size, num_frames=9, num_inference_steps=4, guidance_scale=4.0,
                  generator=torch.Generator(device="cpu").manual_seed(3), output_type="np").frames[0]
    written = _read_png_folder(out)
    assert written.shape == direct.shape == (9, size, size, 3)
    assert np.abs(written.astype(np.float64) - direct * 255).max() <= 1  # equal within 8-bit rounding
    side = json.loads((tmp_path / "clip.png.json").read_text())
    assert side["image"] == str(i2v["image"])
    assert side["image_sha256"] == hashlib.sha256(i2v["image"].read_bytes()).hexdigest()
    capsys.readouterr()
    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(argv) == 0  # the same request again: skipped from its sidecar, no weights loaded
    assert "skip (exists)" in capsys.readouterr().err
    other = tmp_path / "other.png"  # the same picture at another path: another request
    shutil.copy(i2v["image"], other)
    assert main([*argv[:-1], str(other)]) == 2
    [line] = _error_lines(capsys)
    assert "exists with other settings (image " in line and "other.png" in line


@pytest.mark.parametrize("name,image,match", [
    ("wan21-i2v", None, "holds an image-to-video WanImageToVideoPipeline: give its first frame with --image PATH"),
    ("wan21", "first.png", "--image: "),  # a text-only folder
    ("wan21-i2v", "missing.png", "--image '{dir}/missing.png' does not exist"),
    ("wan21-i2v", "notes.png", "cannot be read as an image (png, jpg, webp)"),
    ("wan22-i2v", "clip.gif", "is a GIF image; accepted: png, jpg, webp"),
])
def test_bad_image_requests_are_one_line_before_any_weights_load(wan, i2v, tmp_path, capsys, no_load, name, image,
                                                                  match):
    from tests.tiny import tiny_picture

    shutil.copy(i2v["image"], tmp_path / "first.png")
    (tmp_path / "notes.png").write_text("not a picture")
    tiny_picture(1).save(tmp_path / "clip.gif")
    folder = i2v.get(name) or wan[name]
    out = tmp_path / "new" / "x.mp4"
    argv = ["generate", PROMPT, "-o", str(out), "--model", str(folder), *ARGS]
    assert main(argv + ([] if image is None else ["--image", str(tmp_path / image)])) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("dit: error: ") and match.format(dir=tmp_path) in lines[0], lines
    if name == "wan21":
        assert "text-to-video WanPipeline" in lines[0]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_image_formats_read_as_diffusers_load_image(tmp_path, ext):
    from diffusers.utils import load_image

    from dit.requests import read_image
    from tests.tiny import tiny_picture

    path = tmp_path / f"first.{ext}"
    tiny_picture(2).save(path)
    picture, digest = read_image(str(path))
    assert picture.mode == "RGB" and len(digest) == 64
    assert np.array_equal(np.asarray(picture), np.asarray(load_image(str(path))))
