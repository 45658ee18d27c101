"""`dit generate` end to end on a tiny saved model: files, sidecars, reruns, and one-line errors (exit 2)."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest

from dit.cli import main
from tests.tiny import tiny_cogvideox_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cogvideox")
    tiny_cogvideox_pipeline(folder)
    return folder


ARGS = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "1.0"]


def test_mp4_has_requested_frames_and_size_and_sidecar(model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(model), "--seed", "3", *ARGS]) == 0
    frames = iio.imread(out, plugin="FFMPEG")
    assert frames.shape == (9, 32, 32, 3)
    side = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert side["prompt"] == "a red circle" and side["seed"] == 3 and side["frames"] == 9
    assert side["height"] == 32 and side["steps"] == 2 and side["model"] == str(model)
    mtime = out.stat().st_mtime_ns
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(model), "--seed", "3", *ARGS]) == 0
    assert out.stat().st_mtime_ns == mtime and "skip (exists)" in capsys.readouterr().err  # a rerun skips
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(model), "--overwrite", *ARGS]) == 0
    assert out.stat().st_mtime_ns != mtime


def test_relay_doubles_the_written_size(model, tmp_path):
    out = tmp_path / "relay.webp"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(model), "--relay", "2", *ARGS]) == 0
    from PIL import Image

    with Image.open(out) as im:  # imageio reads one frame of a WebP; Pillow counts them all
        assert (im.n_frames, im.size) == (9, (64, 64))
    assert json.loads((tmp_path / "relay.webp.json").read_text())["relay"] == 2


def test_batch_from_jsonl_with_formats_and_resume(model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a green square", "seed": 7}\n{"prompt": "a blue circle", "frames": 5}\n')
    outdir = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "-o", str(outdir), "--format", "gif",
                 "--model", str(model), *ARGS]) == 0
    files = sorted(p.name for p in outdir.iterdir())
    assert files == ["0000-a-green-square-s7.gif", "0000-a-green-square-s7.gif.json",
                     "0001-a-blue-circle-s1.gif", "0001-a-blue-circle-s1.gif.json"]
    assert iio.imread(outdir / files[2], index=None).shape[0] == 5
    os.remove(outdir / files[0])  # as if interrupted: the rerun writes only the missing one
    before = (outdir / files[2]).stat().st_mtime_ns
    assert main(["generate", "--prompts-file", str(prompts), "-o", str(outdir), "--format", "gif",
                 "--model", str(model), *ARGS]) == 0
    assert (outdir / files[0]).exists() and (outdir / files[2]).stat().st_mtime_ns == before


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "dit", *argv], capture_output=True, text=True)


def _main_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("argv,match", [
    (["--height", "30"], "height 30 must be divisible by 16"),
    (["--frames", "8"], "num_frames 8 must be 1 + 4n"),
])
def test_bad_sizes_refused_before_loading(model, tmp_path, capsys, argv, match, monkeypatch):
    import dit.pipeline

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the size check")

    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", no_load)
    code, line = _main_error(capsys, ["generate", "a cat", "-o", str(tmp_path / "x.mp4"), "--model", str(model),
                                      *ARGS, *argv])
    assert code == 2 and line.startswith("dit: error: ") and match in line
    assert not (tmp_path / "x.mp4").exists()


def test_other_bad_input_one_line_exit_2(model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a", "colour": "red"}\n')
    cases = [
        (["generate", "a cat", "--model", str(tmp_path / "missing")], "does not exist"),
        (["generate", "a cat", "--model", str(model), "-o", str(blocked / "sub" / "x.mp4")], "cannot write to output folder"),
        (["generate", "--prompts-file", str(empty), "--model", str(model)], "is empty"),
        (["generate", "--prompts-file", str(bad_jsonl), "--model", str(model)], "unknown keys ['colour']"),
        (["generate", "", "--model", str(model)], "the prompt is empty"),
        (["generate", "--model", str(model)], "give a PROMPT or --prompts-file"),
        (["generate", "a cat", "--model", str(model), "--offload"], "--offload moves models between CPU and GPU"),
        (["generate", "a cat", "--model", str(model), "--vae-tile", "64"],
         "--vae-tile: exact tiles are the Wan VAE's (AutoencoderKLWan); this model's VAE is AutoencoderKLCogVideoX"),
    ]
    for argv, match in cases:
        code, line = _main_error(capsys, argv)
        assert code == 2 and line.startswith("dit: error: ") and match in line, (argv, line)


def test_error_from_a_real_process_is_one_line_without_traceback(tmp_path):
    r = _run("generate", "a cat", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip() == f"dit: error: model folder {str(tmp_path / 'missing')!r} does not exist"


def test_help_for_every_subcommand(capsys):
    for argv in (["--help"], ["generate", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "usage: dit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--relay" in capsys.readouterr().out


@pytest.mark.parallel
def test_generate_under_torchrun_with_context_parallelism_equals_single_process(model, tmp_path):
    # 17 frames = 5 latent frames = 2 of diffusers' decode batches: the VAE decode is split over the 2 ranks too.
    args = [*ARGS, "--frames", "17"]
    single = tmp_path / "single.png"
    assert main(["generate", "a red circle", "-o", str(single), "--model", str(model), "--seed", "5", *args]) == 0
    par = tmp_path / "par.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    from distributed import _free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()),
                        "-m", "dit", "generate", "a red circle", "-o", str(par), "--model", str(model), "--seed", "5",
                        "--ulysses-degree", "2", *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = [iio.imread(p) for p in sorted(single.iterdir())]
    b = [iio.imread(p) for p in sorted(par.iterdir())]
    assert len(a) == len(b) == 17
    assert max(abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 1  # same frames (8-bit rounding)
    assert json.loads((tmp_path / "par.png.json").read_text())["context_parallel"] == [1, 2]


def _generate_in_callers_group(rank, world, model, out):
    import torch.distributed as dist

    os.environ["WORLD_SIZE"] = str(world)
    assert main(["generate", "a red circle", "-o", out, "--model", model, "--seed", "5", "--ulysses-degree", "2",
                 *ARGS]) == 0
    assert dist.is_initialized()  # the caller's process group is still open
    dist.barrier()


def test_generate_leaves_a_process_group_it_did_not_start_open(model, tmp_path):
    from distributed import run_distributed

    run_distributed(_generate_in_callers_group, 2, str(model), str(tmp_path / "x.png"))
    assert len(list((tmp_path / "x.png").iterdir())) == 9


def test_parallel_degrees_without_torchrun_is_a_clear_error(model, tmp_path, capsys):
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.mp4"), "--model", str(model), "--ulysses-degree", "2",
                 *ARGS])
    assert code == 2 and "launch with `torchrun" in capsys.readouterr().err


def test_cfg_parallel_needs_guidance_and_torchrun(model, tmp_path, capsys):
    out = str(tmp_path / "x.mp4")
    assert main(["generate", "a cat", "-o", out, "--model", str(model), "--cfg-degree", "2", *ARGS]) == 2
    assert "--cfg-degree 2 runs the two halves of classifier-free guidance; it needs --guidance > 1, got 1.0" \
        in capsys.readouterr().err
    assert main(["generate", "a cat", "-o", out, "--model", str(model), "--cfg-degree", "2", *ARGS,
                 "--guidance", "6"]) == 2
    assert "--cfg-degree 2 x --ring-degree 1 x --ulysses-degree 1 = 2 processes; launch with `torchrun" \
        in capsys.readouterr().err


def test_a_video_format_from_an_image_pipeline_folder_is_a_clear_error_before_loading(tmp_path, capsys):
    from tiny import tiny_sd3_pipeline

    tiny_sd3_pipeline(tmp_path / "sd3")  # image folders themselves: test_cli_image.py
    code = main(["generate", "a cat", "--model", str(tmp_path / "sd3"), "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and ("x.mp4: a StableDiffusion3Pipeline folder makes images; accepted: png, webp, jpg, "
                          "jpeg") in err
