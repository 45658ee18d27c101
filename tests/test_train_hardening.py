"""dit train against a hostile or messy output_dir and process tree: no write through planted links, leftovers of
killed runs removed, one run per output_dir, workers that die with their launcher, checkpoints fsynced whole,
finite config floats."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.train.config import load_config, parse_config
from tests._accelerate import fresh_accelerate_state, reset_accelerate  # noqa: F401  (autouse here)

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: prctl, /proc/self/fd")


def _tiny(out: Path, steps: int):
    return load_config(ROOT / "configs/train/tiny-cpu.yaml", overrides={
        "output_dir": str(out), "train.steps": steps, "train.checkpoint_every": 1, "train.keep_last": 1,
        "train.validate_every": None, "train.batch_size": 1, "data.shapes": {"length": 4, "antialias": 1}})


def _run(out: Path, steps: int) -> Path:
    from dit.train.trainer import Trainer

    try:
        return Trainer(_tiny(out, steps)).run()
    finally:
        reset_accelerate()


def _steps(out: Path) -> list[int]:
    import json

    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("key, value, shown", [
    ("optim.max_grad_norm", math.nan, "nan"),
    ("optim.lr", math.inf, "inf"),
    ("optim.betas", [0.9, math.nan], "nan"),
    ("objective.kl_weight", math.nan, "nan"),
    ("train.validation_guidance", -math.inf, "-inf"),
])
def test_config_floats_must_be_finite(key, value, shown):
    where = f"{key}[1]" if key == "optim.betas" else key
    with pytest.raises(ValueError, match=rf"^{re.escape(where)}: expected a finite number, got {shown}$"):
        parse_config({"output_dir": "out", "model": {"transformer_preset": "cogvideox-tiny"}}, overrides={key: value})


def test_config_yaml_nan_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nmodel: {transformer_preset: cogvideox-tiny}\noptim: {max_grad_norm: .nan}\n")
    with pytest.raises(ValueError, match=r"c.yaml: optim.max_grad_norm: expected a finite number, got nan$"):
        load_config(path)


# ------------------------------------------------------------------------------------------------ links and leftovers


def test_run_removes_leftovers_and_never_writes_through_planted_links(tmp_path):
    from dit.train.launch import lock_output_dir

    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep\n")
    # What killed runs leave: an export's temporary folder, checkpoint temporaries, dit.outputs' temporary folder of
    # a dead process, and links among them that deleting must not follow.
    (out / ".tmp-final-999999" / "pipeline").mkdir(parents=True)
    (out / ".tmp-final-999999" / "pipeline" / "x.bin").write_bytes(b"x")
    (out / ".tmp-elsewhere").symlink_to(outside, target_is_directory=True)
    (out / "checkpoints" / ".tmp-step-00000009").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-00000008").symlink_to(outside, target_is_directory=True)
    dead = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from dit.outputs import "
                           "private_tmpdir; print(private_tmpdir(Path(sys.argv[1])))", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(dead).is_dir()
    final = _run(out, 2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert sorted(p.name for p in final.iterdir()) == ["pipeline", "trainer_state.json"]
    assert victim.read_text() == "keep\n" and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]

    # The resume's rewrite of metrics.jsonl used a fixed temporary name: a link there must not be followed.
    (out / ".metrics.jsonl.tmp").symlink_to(victim)
    _run(out, 3)
    assert victim.read_text() == "keep\n" and _steps(out) == [1, 2, 3]

    # Links at config.json and metrics.jsonl: refused before any training, nothing written through them.
    for name in ("config.json", "metrics.jsonl"):
        kept = (out / name).read_bytes()
        (out / name).unlink()
        (out / name).symlink_to(victim)
        with pytest.raises(ValueError, match="symbolic link"):
            _run(out, 4)
        assert victim.read_text() == "keep\n"
        (out / name).unlink()
        (out / name).write_bytes(kept)
    assert _steps(out) == [1, 2, 3]
    os.close(lock_output_dir(out))  # every run, failed ones included, released the lock


def test_validation_media_are_atomic_and_do_not_import_the_cli(tmp_path, monkeypatch):
    from dit.train import trainer

    monkeypatch.setitem(sys.modules, "dit.cli", None)  # library code must not import the command line
    frames = np.random.default_rng(0).random((2, 16, 16, 3))
    trainer._write_media(frames, tmp_path / "a.mp4")
    trainer._write_media(frames[:1], tmp_path / "a.png")
    assert (tmp_path / "a.mp4").stat().st_size > 0 and (tmp_path / "a.png").stat().st_size > 0
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in ("b.mp4", "b.png"):
        (tmp_path / name).symlink_to(victim)
        with pytest.raises(ValueError, match="symbolic link"):
            trainer._write_media(frames, tmp_path / name)
    assert victim.read_text() == "keep"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "validation").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        trainer._subfolder(tmp_path / "out", "validation", "step-00000001")
    assert not (tmp_path / "step-00000001").exists()


# ------------------------------------------------------------------------------------------------ one run per folder


def test_a_second_run_on_a_locked_output_dir_fails_before_training(tmp_path):
    from dit.train.launch import lock_output_dir
    from dit.train.trainer import Trainer

    out = tmp_path / "out"
    out.mkdir()
    held = lock_output_dir(out)  # the other run (flock: separate opens conflict even within one process)
    try:
        trainer = Trainer(_tiny(out, 2))
        message = (f"output_dir {out} is in use by another dit train run (pid {os.getpid()}); wait for it or "
                   f"choose another output_dir")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            trainer.run()
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no config, metrics or checkpoint written


def _lock_on_two_ranks(rank: int, world: int, locked: str, free: str) -> None:
    from dit.train.launch import exclusive_output_dir

    with pytest.raises(ValueError, match="is in use by another dit train run"):
        with exclusive_output_dir(Path(locked), rank == 0):
            raise AssertionError("entered an output_dir locked by another run")
    entered = []
    with exclusive_output_dir(Path(free), rank == 0):
        entered.append(rank)
    assert entered == [rank]


@pytest.mark.parallel
def test_every_rank_fails_together_when_the_output_dir_is_locked(tmp_path):
    from distributed import run_distributed

    from dit.train.launch import lock_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    held = lock_output_dir(locked)
    try:
        run_distributed(_lock_on_two_ranks, 2, str(locked), str(tmp_path / "free"))
    finally:
        os.close(held)


# ------------------------------------------------------------------------------------------------ launcher death

_CHILD = """
import os, sys, time
from dit.train import launch
parent = os.getppid()
print("ready", flush=True)
if sys.argv[1] == "early":  # the launcher dies before the worker reaches die_with_launcher
    while os.getppid() == parent:
        time.sleep(0.02)
launch.die_with_launcher()
open(sys.argv[2], "w").write("survived")
time.sleep(60)
"""

_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(60)
"""


@linux_only
@pytest.mark.parametrize("when", ["late", "early"])
def test_a_worker_ends_when_its_launcher_is_killed(tmp_path, when):
    import psutil

    marker = tmp_path / "survived"
    env = {**os.environ, "LOCAL_RANK": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, when, str(marker)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    if when == "late":
        deadline = time.monotonic() + 30
        while not marker.exists():  # die_with_launcher has run
            assert time.monotonic() < deadline
            time.sleep(0.02)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker outlived its launcher")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert marker.exists() == (when == "late")  # early: ended inside die_with_launcher


# ------------------------------------------------------------------------------------------------ checkpoints


@linux_only
def test_checkpoint_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from dit.train import checkpoint as ckpt

    acc = Accelerator(cpu=True)
    linear = torch.nn.Linear(3, 2)
    model, optimizer = acc.prepare(linear, torch.optim.AdamW(linear.parameters()))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = ckpt.EMA(list(model.parameters()), 0.9)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path.resolve() / "out"
    final = ckpt.save_checkpoint(acc, out, 3, {"world": 1}, 2, lr_scheduler=schedule, ema=ema)
    renamed = events.index(("replace", str(final)))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    tmp = final.with_name(".tmp-step-00000003")
    wanted = {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in final.iterdir()}
    assert wanted - synced == set()
    assert ("fsync", str(final.parent)) in events[renamed:]  # the rename itself made durable
