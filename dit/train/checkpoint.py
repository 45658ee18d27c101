"""Checkpoints: written atomically, the last N kept, and found again for an automatic resume; plus the EMA.

A checkpoint is `OUTPUT/checkpoints/step-NNNNNNNN/`. It is first written as `.tmp-step-NNNNNNNN/` (accelerate's
save_state: model, optimizer, RNG states of every rank; plus our `ema.safetensors`, `lr_scheduler.json` and
`trainer_state.json`) and renamed when every rank has finished writing, so a folder named `step-*` is always
complete: a run killed mid-write leaves only a `.tmp-*` folder, which the next start deletes.

The EMA and the LR schedule are not registered with accelerate: it would pickle them and load them back with
`torch.load(weights_only=False)`, which runs whatever code the file holds. The EMA is weights, so it is a
safetensors file; the schedule's state is a few numbers, so JSON. (accelerate loads the optimizer and RNG files
with `weights_only=True`, the restricted unpickler; the model is safetensors.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit.outputs import fsync_dir, fsync_tree, remove_stale_temps

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
SCHEDULE_FILE = "lr_scheduler.json"


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32 whatever the training precision."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({f"shadow.{i}": s.cpu().contiguous() for i, s in enumerate(self.shadow)}, str(path),
                  metadata={"decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            decay = (f.metadata() or {}).get("decay")
            if decay != repr(self.decay):
                raise ValueError(f"{path}: the checkpoint's EMA has decay {decay}, this run's train.ema_decay is "
                                 f"{self.decay}; resume with the same decay, or start a new output_dir")
            if len(f.keys()) != len(self.shadow):
                raise ValueError(f"{path}: the checkpoint's EMA has {len(f.keys())} tensors, the model "
                                 f"{len(self.shadow)}")
            for i, s in enumerate(self.shadow):
                t = f.get_tensor(f"shadow.{i}")
                if t.shape != s.shape:
                    raise ValueError(f"{path}: EMA tensor {i} has shape {tuple(t.shape)}, the model's "
                                     f"{tuple(s.shape)}")
                s.copy_(t)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: str | Path) -> None:
    """Delete `.tmp-*` folders left by a run killed while writing (main process only)."""
    remove_temps(checkpoints_dir(output_dir))


def remove_leftovers(output_dir: str | Path) -> None:
    """Delete what killed runs left in output_dir: `.tmp-*` there (the export's `.tmp-final-*` of earlier
    versions) and in checkpoints/, and dit.outputs' temporary folders of dead processes there and in the
    validation folders. Called with the output_dir's lock held, so a `.tmp-*` can only be a dead run's."""
    output = Path(output_dir)
    remove_temps(output)
    remove_partial(output)
    for folder in (output, *sorted((output / "validation").glob("step-*"))):
        if not folder.is_symlink():
            remove_stale_temps(folder)


def remove_temps(folder: Path) -> None:
    """Delete the `.tmp-*` entries of `folder`; a symbolic link is unlinked, never followed."""
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".tmp-")]
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # rmtree does not follow links inside either
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int, *,
                    lr_scheduler, ema: EMA | None = None) -> Path:
    """Every rank calls this; returns the final folder. Keeps the newest `keep_last` checkpoints."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The EMA and the schedule are the same on every rank (the EMA is refused with sharded parameters).
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        (tmp / SCHEDULE_FILE).write_text(json.dumps(lr_scheduler.state_dict(), indent=2) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        # Every file (accelerate's of every rank included) and folder on disk before the rename publishes them:
        # a crash after it must not leave a step-* folder with empty or missing files.
        fsync_tree(tmp)
        if final.exists():  # the same step written again (a rerun after a crash between rename and prune)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path, *, lr_scheduler, ema: EMA | None = None) -> dict[str, Any]:
    """Restore everything save_checkpoint wrote; returns the trainer state (step, data position, ...)."""
    if list(folder.glob("custom_checkpoint_*.pkl")) and not (folder / SCHEDULE_FILE).is_file():
        raise ValueError(f"{folder} keeps its LR schedule and EMA as pickles (written by an earlier dit), which are "
                         f"not loaded: they could run code. This version cannot continue that run: start a new "
                         f"output_dir (with model.pretrained: <that output_dir>/final/pipeline if the run finished)")
    if (ema is not None) != (folder / EMA_FILE).is_file():
        raise ValueError(f"{folder} was written {'without' if ema is not None else 'with'} an EMA and this run has "
                         f"train.ema_decay {'set' if ema is not None else 'null'}: resume with the same setting, or "
                         f"start a new output_dir")
    accelerator.load_state(str(folder))
    lr_scheduler.load_state_dict(json.loads((folder / SCHEDULE_FILE).read_text()))
    if ema is not None:
        ema.load(folder / EMA_FILE)
    return json.loads((folder / STATE_FILE).read_text())
