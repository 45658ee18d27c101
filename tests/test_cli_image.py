"""`dit generate` on tiny image folders (SD3, SD3.5, CogView3-Plus, class-conditional DiT) and the demo's one-frame
image: the written pictures equal our pipeline's for the same seed, and our pipeline gives diffusers' images;
formats, --num-images, sidecars and resume; torchrun; every bad request one line before any weights load."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dit.estimate
import dit.pipeline
import dit.requests
from dit import DiTPipeline
from dit.cli import main
from tests.tiny import tiny_cogview3plus_pipeline, tiny_dit_pipeline, tiny_sd3_pipeline

PROMPT, NEGATIVE = "a red circle", "blue"
TEXT_ARGS = ["--steps", "3", "--guidance", "4.0", "--negative-prompt", NEGATIVE, "--height", "32", "--width", "32"]
DIT_ARGS = ["--steps", "3", "--guidance", "4.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (folder, the diffusers pipeline saved there)} for sd3, sd35, cogview3plus and dit."""
    root = tmp_path_factory.mktemp("tiny-image")
    built = {"sd3": tiny_sd3_pipeline(root / "sd3"), "sd35": tiny_sd3_pipeline(root / "sd35", sd35=True),
             "cogview3plus": tiny_cogview3plus_pipeline(root / "cogview3plus"), "dit": tiny_dit_pipeline(root / "dit")}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return {name: (root / name, pipe) for name, pipe in built.items()}


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if any weights are loaded (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", refuse)


def _call_kwargs(name: str, seed: int) -> dict:
    """The call `dit generate` makes for PROMPT (DiT: class 207, 'golden retriever'), as diffusers takes it."""
    common = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator(device="cpu").manual_seed(seed))
    if name == "dit":
        return dict(class_labels=[207], **common)
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, **common)


def _argv(folders, name: str, out, *extra) -> list[str]:
    prompt, args = ("golden retriever", DIT_ARGS) if name == "dit" else (PROMPT, TEXT_ARGS)
    return ["generate", prompt, "-o", str(out), "--model", str(folders[name][0]), *args, *extra]


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("name", ["sd3", "sd35", "cogview3plus", "dit"])
def test_the_cli_writes_the_pipelines_image_which_is_diffusers_and_a_rerun_skips(folders, tmp_path, capsys,
                                                                                  monkeypatch, name):
    folder, reference = folders[name]
    out = tmp_path / "image.png"
    argv = _argv(folders, name, out, "--seed", "3")
    assert main(argv) == 0
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(**_call_kwargs(name, 3)).images[0]
    expected = reference(**_call_kwargs(name, 3)).images[0]
    size = 16 if name == "dit" else 32
    assert ours.shape == expected.shape == (size, size, 3)
    assert np.abs(ours - expected).max() <= 1e-4  # our pipeline gives diffusers' image
    assert np.abs(_read(out) - ours * 255).max() <= 0.5 + 1e-3  # the file is that image, rounded to 8 bits
    side = json.loads((tmp_path / "image.png.json").read_text())
    assert (side["seed"], side["steps"], side["guidance"], side["frames"]) == (3, 3, 4.0, 1) and "fps" not in side
    assert (side["height"], side["width"], side["model"]) == (size, size, str(folder))
    assert side.get("class_label") == (207 if name == "dit" else None)
    capsys.readouterr()
    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(argv) == 0  # the same request again: skipped from its sidecar, no weights loaded
    assert "skip (exists)" in capsys.readouterr().err


def test_num_images_formats_and_class_ids(folders, tmp_path, capsys, monkeypatch):
    """--num-images N: N files per prompt, output j with seed + j; webp is lossless, jpeg close; a class given by
    id is the same request as by name (a rerun skips it)."""
    folder, _ = folders["dit"]
    outdir = tmp_path / "out"
    assert main(["generate", "--class", "207", "--class", "360", "--num-images", "2", "--seed", "5", "-o",
                 str(outdir), "--format", "webp", "--model", str(folder), *DIT_ARGS]) == 0
    files = sorted(p.name for p in outdir.iterdir() if p.suffix == ".webp")
    assert files == ["0000-golden-retriever-s5.webp", "0000-golden-retriever-s6.webp", "0001-otter-s6.webp",
                     "0001-otter-s7.webp"]
    side = json.loads((outdir / "0001-otter-s7.webp.json").read_text())
    assert (side["prompt"], side["class_label"], side["seed"]) == ("otter", 360, 7)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    otter = pipe(class_labels=[360], generator=torch.Generator().manual_seed(7), **kw).images[0]
    assert np.abs(_read(outdir / files[3]) - otter * 255).max() <= 0.5 + 1e-3  # lossless webp
    jpeg = tmp_path / "otter.jpg"
    assert main(["generate", "otter", "--seed", "7", "-o", str(jpeg), "--model", str(folder), *DIT_ARGS]) == 0
    assert _read(jpeg).shape == (16, 16, 3) and np.abs(_read(jpeg) - otter * 255).mean() < 8  # lossy, but close
    by_name = tmp_path / "retriever.png"
    assert main(["generate", "golden retriever", "-o", str(by_name), "--model", str(folder), *DIT_ARGS]) == 0
    capsys.readouterr()
    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(["generate", "--class", "207", "-o", str(by_name), "--model", str(folder), *DIT_ARGS]) == 0
    assert "skip (exists)" in capsys.readouterr().err


def test_the_demo_model_writes_one_frame_as_an_image(tmp_path):
    """A video model asked for a png without --frames makes one frame (--frames 1) and writes it as one picture."""
    out = tmp_path / "image.png"
    assert main(["generate", PROMPT, "-o", str(out), "--steps", "4", "--seed", "2"]) == 0
    assert out.is_file()
    side = json.loads((tmp_path / "image.png.json").read_text())
    assert side["frames"] == 1 and "fps" not in side
    pipe = DiTPipeline.from_pretrained(dit.requests.DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, num_frames=1, num_inference_steps=4, guidance_scale=side["guidance"],
                  height=side["height"], width=side["width"], generator=torch.Generator().manual_seed(2),
                  output_type="np").frames[0]
    assert frames.shape == (1, side["height"], side["width"], 3) == (1, 64, 64, 3)
    assert np.abs(_read(out) - frames[0] * 255).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("name,extra,match", [
    ("sd3", ["--height", "30"], "height 30 must be divisible by 4; nearest valid: 28 or 32"),
    ("sd35", ["--frames", "9"], "num_frames 9: a StableDiffusion3Pipeline folder makes single images; drop --frames"),
    ("cogview3plus", ["--frames", "5"], "num_frames 5: a CogView3PlusPipeline folder makes single images"),
    ("sd3", ["--width", "256"], "32x256 is past the transformer's position table: height and width must be at most "
                                "128"),
    ("sd3", ["--relay", "8"], "--relay 8 makes 256x256, past the transformer's position table (128 pixels per side)"
                              "; the largest relay at 32x32 is 4"),
    ("dit", ["--height", "32"], "32x16: DiTPipeline folders generate at the transformer's sample size, 16x16"),
    ("sd3", ["-o", "{dir}/x.mp4"], "x.mp4: a StableDiffusion3Pipeline folder makes images; accepted: png, webp, "
                                   "jpg, jpeg"),
    ("dit", ["--format", "gif", "-o", "{dir}/"], "--format gif: a DiTPipeline folder makes images"),
    ("sd3", ["--num-images", "2"], "names one file, but --num-images 2 makes 2 outputs; give a folder instead"),
    ("sd3", ["--class", "3"], "--class 3: '{model}' holds a StableDiffusion3Pipeline, which takes a text PROMPT"),
    ("dit", ["--negative-prompt", "cat"], "a DiTPipeline folder takes no negative prompt"),
])
def test_bad_image_requests_are_one_line_before_any_weights_load(folders, tmp_path, capsys, no_load, name, extra,
                                                                 match):
    out = tmp_path / "new" / "x.png"
    argv = _argv(folders, name, out, *[e.format(dir=tmp_path / "new") for e in extra])
    if "--class" in extra:
        argv.remove(PROMPT)  # a class id instead of a prompt
    if "--relay" in extra and not dit.pipeline.SD3DiTPipeline.supports_relay:
        pytest.skip("SD3 pipelines have no relay stage in this tree")
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = match.format(model=folders[name][0])
    assert len(lines) == 1 and lines[0].startswith("dit: error: ") and expected in lines[0], lines
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv,match", [
    (["golden retrever"], "unknown class 'golden retrever' (close matches: 'golden retriever'); name a class of the "
                          "folder's id2label, or give its id (--class N, 0 to 999)"),
    (["Otter"], "unknown class 'Otter' (close matches: 'otter')"),
    (["--class", "1000"], "class 1000 is not in this DiT's label table: ids 0 to 999"),
    (["otter", "--class", "360"], "give one of a PROMPT or --class, not both"),
    (["otter", "--ulysses-degree", "2"], "DiTPipeline: the DiTTransformer2DModel has no context parallelism yet"),
])
def test_bad_class_requests_are_one_line_before_any_weights_load(folders, tmp_path, capsys, no_load, monkeypatch,
                                                                 argv, match):
    if "--ulysses-degree" in argv:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: refused before any process group or load
    out = tmp_path / "new" / "x.png"
    assert main(["generate", *argv, "-o", str(out), "--model", str(folders["dit"][0]), *DIT_ARGS]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit: error: ") and match in lines[0], lines
    assert not (tmp_path / "new").exists()


def test_a_jpeg_of_several_frames_from_a_video_model_is_refused(tmp_path, capsys, no_load):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "clip.jpg"), "--frames", "9"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "jpg holds one picture, but the request has 9 frames; give --frames 1, or a video format" in line


def test_an_image_that_cannot_fit_is_refused_with_a_size_that_fits(folders, tmp_path, capsys, no_load, monkeypatch):
    shape = dit.estimate.video_shape(folders["sd3"][0])
    assert (shape.temporal, shape.text_tokens, shape.vae_maps) == (1, 77 + 256, 6)  # one frame, CLIP + T5 tokens
    opts = dict(relay=None, guidance=4.0, dtype_bytes=4)
    budget = dit.estimate.video_request_bytes(shape, 64, 64, 1, **opts)
    monkeypatch.setattr(dit.estimate, "available_bytes", lambda device: budget)
    assert main(_argv(folders, "sd3", tmp_path / "x.png", "--height", "128", "--width", "128")) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dit: error: 128x128 needs about ") and "frames" not in line and "--force" in line
    fits = line.split("what fits: ")[1].split(" ")[0]
    height, width = map(int, fits.split("x"))
    assert 64 <= height < 128 and height == width and height % 4 == 0


@pytest.mark.parallel
def test_generate_under_torchrun_with_context_parallelism_equals_single_process(folders, tmp_path):
    """SD3's joint attention runs context parallel (Ulysses over its 4 heads); the image equals one process's."""
    single, par = tmp_path / "single.png", tmp_path / "par.png"
    assert main(_argv(folders, "sd3", single, "--seed", "5")) == 0
    from distributed import _free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "dit", *_argv(folders, "sd3", par, "--seed", "5"),
                        "--ulysses-degree", "2"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.abs(_read(single) - _read(par)).max() <= 1  # the same image (8-bit rounding)
    assert json.loads((tmp_path / "par.png.json").read_text())["context_parallel"] == [1, 2]
