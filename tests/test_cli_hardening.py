"""`dit generate` against a hostile or careless user: planted links, kills between writes, stale temporaries,
resume with other settings, requests that cannot fit, non-finite results, and every bad input one line."""

import json
import os
import subprocess
import sys

import pytest

import dit.generate
import dit.pipeline
from dit.cli import main
from dit.outputs import TMP_PREFIX, _HOST
from tests.tiny import tiny_cogvideox_pipeline

ARGS = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "1.0"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cogvideox")
    tiny_cogvideox_pipeline(folder)
    return folder


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if any weights are loaded (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(dit.pipeline.DiTPipeline, "from_pretrained", refuse)


def _gen(model, out, *extra):
    return main(["generate", "a red circle", "-o", str(out), "--model", str(model), *ARGS, *extra])


def _error(capsys, code_expected=2):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- 1. links at the temporary and final names --------------------------------------------------------------------


def test_links_planted_at_the_old_temporary_names_change_nothing_outside(model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out" / "clip.mp4"
    out.parent.mkdir()
    pid = os.getpid()  # the names earlier versions wrote through: .STEM.tmp-PID.SUFFIX
    for name in (f".clip.tmp-{pid}.mp4", f".clip.mp4.tmp-{pid}.json"):
        (out.parent / name).symlink_to(victim)
    assert _gen(model, out) == 0
    assert victim.read_text() == "precious"
    assert out.is_file() and not out.is_symlink() and (out.parent / "clip.mp4.json").is_file()


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mp4.json"])
def test_a_link_at_the_final_name_is_refused_and_replaced_only_with_overwrite(model, tmp_path, capsys, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "clip.mp4"
    (tmp_path / name).symlink_to(victim)
    assert _gen(model, out) == 2
    assert "is a symbolic link" in _error(capsys) and victim.read_text() == "precious"
    assert _gen(model, out, "--overwrite") == 0
    assert victim.read_text() == "precious" and not (tmp_path / name).is_symlink()


# -- 3. kills between the two renames, stale temporaries ----------------------------------------------------------


def test_a_kill_between_sidecar_and_output_is_completed_by_the_rerun(model, tmp_path, monkeypatch):
    out = tmp_path / "clip.gif"

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dit.generate, "write_video", killed)
        assert _gen(model, out) == 130
    assert (tmp_path / "clip.gif.json").is_file() and not out.exists()
    assert _gen(model, out) == 0  # a sidecar without its output is an interrupted run: redone
    assert out.is_file()


def test_an_output_without_its_sidecar_is_not_skipped_silently(model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"someone else's file")
    assert _gen(model, out) == 2
    assert "has no sidecar" in _error(capsys) and out.read_bytes() == b"someone else's file"


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(model, tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f"{TMP_PREFIX}{_HOST}-{dead}-abc", tmp_path / f".clip.tmp-{dead}.mp4",
             tmp_path / f".0000-x.png.tmp-{dead}"]
    stale[0].mkdir()
    (stale[0] / "clip.mp4").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    stale[2].mkdir()
    kept = [tmp_path / f"{TMP_PREFIX}{_HOST}-{live}-abc", tmp_path / f"{TMP_PREFIX}otherhost-{dead}-abc"]
    for k in kept:
        k.mkdir()
    assert _gen(model, tmp_path / "clip.mp4") == 0
    assert not any(p.exists() for p in stale) and all(k.exists() for k in kept)


# -- 4. --overwrite of a PNG folder ---------------------------------------------------------------------------------


def test_overwrite_replaces_a_png_folder(model, tmp_path):
    out = tmp_path / "frames.png"
    assert _gen(model, out) == 0
    (out / "stray.txt").write_text("x")
    assert _gen(model, out, "--overwrite", "--seed", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:04d}.png" for i in range(9)]
    assert json.loads((tmp_path / "frames.png.json").read_text())["seed"] == 1


# -- 9. resume compares settings ------------------------------------------------------------------------------------


def test_a_rerun_with_other_settings_says_which_differ(model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert _gen(model, out) == 0
    mtime = out.stat().st_mtime_ns
    assert _gen(model, out, "--steps", "3", "--seed", "4") == 2
    line = _error(capsys)
    assert "exists with other settings" in line and "seed 0 -> 4" in line and "steps 2 -> 3" in line
    assert _gen(model, out) == 0 and out.stat().st_mtime_ns == mtime  # identical request: skipped
    assert _gen(model, out, "--steps", "3", "--overwrite") == 0
    assert json.loads((tmp_path / "clip.mp4.json").read_text())["steps"] == 3


# -- 6. requests that cannot fit, 8. non-finite results -----------------------------------------------------------


@pytest.mark.parametrize("extra,match", [
    (["--frames", "1000001"], "--frames"),
    (["--relay", "64", "--height", "512", "--width", "512"], "x"),
])
def test_a_request_that_cannot_fit_is_refused_with_what_fits(model, tmp_path, capsys, no_load, extra, match):
    assert _gen(model, tmp_path / "x.mp4", *extra) == 2
    line = _error(capsys)
    assert "GiB but" in line and "what fits:" in line and match in line.split("what fits:")[1]
    assert "--force" in line and not (tmp_path / "x.mp4").exists()


def test_force_skips_the_memory_estimate(model, tmp_path, capsys, monkeypatch):
    import dit.estimate

    monkeypatch.setattr(dit.estimate, "available_bytes", lambda device: 1)
    assert _gen(model, tmp_path / "a.mp4") == 2 and "needs about" in _error(capsys)
    assert _gen(model, tmp_path / "a.mp4", "--force") == 0


def test_non_finite_results_fail_and_write_nothing(model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(model), *ARGS[:-2],
                 "--guidance", "1e308"]) == 1
    line = _error(capsys)
    assert "non-finite (NaN or inf) at step 1 of 2" in line, line  # the step where it appeared
    assert not out.exists() and not (tmp_path / "clip.mp4.json").exists()


# -- 5, 10. bad input: one line, exit 2, before any weights load, nothing left behind -----------------------------


def _jsonl(tmp_path, line):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    return ["--prompts-file", str(path)]


@pytest.mark.parametrize("argv,match", [
    (["--device", "banana"], "is not a torch device"),
    (["--device", "cuda:99"], "CUDA"),
    (["--seed", str(2**64)], "outside the seeds a generator takes"),
    (["--seed", "-1"], "outside the seeds a generator takes"),
    (["--guidance", "0.5"], "is below 1"),
    (["--format", "gif"], "--format is gif"),
])
def test_bad_options_one_line_before_loading(model, tmp_path, capsys, no_load, argv, match):
    assert _gen(model, tmp_path / "new" / "x.mp4", *argv) == 2
    line = _error(capsys)
    assert line.startswith("dit: error: ") and match in line, line
    assert not (tmp_path / "new").exists()  # a refused request leaves no folder behind


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a cat", "height": 0}', "height must be a positive integer, got 0"),
    ('{"prompt": "a cat", "frames": 0}', "frames must be a positive integer, got 0"),
    ('{"prompt": ""}', "the prompt is empty"),
    ('{"prompt": "a cat", "seed": 18446744073709551616}', "seed 18446744073709551616 is outside"),
    ('{"prompt": "a cat", "negative_prompt": 3}', "negative_prompt must be a string"),
])
def test_bad_jsonl_values_one_line_before_loading(model, tmp_path, capsys, no_load, line, match):
    code = main(["generate", *_jsonl(tmp_path, line), "-o", str(tmp_path / "out"), "--model", str(model), *ARGS])
    err = _error(capsys)
    assert code == 2 and match in err, err
    assert not (tmp_path / "out").exists()


def test_a_seed_past_the_range_in_a_batch_is_named_before_loading(model, tmp_path, capsys, no_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    code = main(["generate", "--prompts-file", str(prompts), "--seed", str(2**64 - 1), "--model", str(model), *ARGS,
                 "-o", str(tmp_path / "out")])
    assert code == 2 and "p.txt:2: seed (--seed + 1) 18446744073709551616 is outside" in _error(capsys)


@pytest.mark.parametrize("output,match", [
    ("out.avi", ".avi is not an output format"),
])
def test_unknown_output_extension_is_refused_not_made_a_folder(model, tmp_path, capsys, no_load, output, match):
    assert _gen(model, tmp_path / output) == 2
    assert match in _error(capsys) and not (tmp_path / output).exists()


def test_an_output_folder_with_a_dot_is_taken_with_a_trailing_slash(model, tmp_path):
    folder = str(tmp_path / "run.v2") + "/"
    assert main(["generate", "a red circle", "-o", folder, "--model", str(model), *ARGS]) == 0
    assert len(list((tmp_path / "run.v2").glob("*.mp4"))) == 1


def test_errors_from_a_real_process_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dit", "generate", "a cat", "--device", "banana",
                        "-o", str(tmp_path / "x.mp4")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "dit: error: --device 'banana' is not a torch device; e.g. cpu, cuda, cuda:1"]


def _corrupt_config(folder):
    (folder / "transformer" / "config.json").write_text("[1, 2]")


def _truncate_weights(folder):
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _pickled_text_encoder(folder):
    import torch

    te = folder / "text_encoder"
    weights = te / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), te / "pytorch_model.bin")
    weights.unlink()


def _size_mismatch(folder):
    from safetensors.torch import load_file, save_file

    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    key = next(k for k, v in state.items() if v.ndim == 5)
    state[key] = state[key][:1].contiguous()
    save_file(state, f)


@pytest.mark.parametrize("corrupt,match", [
    (_corrupt_config, "config.json' holds a JSON array"),
    (_truncate_weights, "diffusion_pytorch_model.safetensors"),
    (_pickled_text_encoder, "never"),
    (_size_mismatch, "vae"),
])
def test_a_corrupt_model_folder_is_one_line_exit_2(model, tmp_path, capsys, corrupt, match):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    corrupt(folder)
    code = main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), "--model", str(folder), *ARGS])
    line = _error(capsys)
    assert code == 2 and line.startswith("dit: error: ") and match in line, line
    assert not (tmp_path / "x.mp4").exists()


def test_cuda_without_cuda_is_one_line(model, tmp_path, capsys, no_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gen(model, tmp_path / "x.mp4", "--device", "cuda") == 2
    assert "CUDA is not available here" in _error(capsys)


def test_non_finite_frames_are_not_written(tmp_path):
    """The second check, on the decoded frames (a VAE that overflows after finite latents)."""
    import numpy as np

    frames = np.zeros((3, 8, 8, 3), dtype=np.float32)
    frames[1, 2, 2, 0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        dit.generate._write_output(frames, tmp_path / "out" / "clip.mp4", {"prompt": "x"}, 8, False)
    assert not (tmp_path / "out").exists()
