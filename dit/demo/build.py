"""Build the embedded demo model: `python -m dit.demo.build` from the repository root.

Five `dit train` runs from configs/demo/ (the VAE; the VAE trained further at a new learning rate; the base
transformer on still images, then on clips with images mixed in; the relay super-resolution transformer; the
transformer stages' latent caches are built first), then the pieces are assembled into one diffusers-format
CogVideoX pipeline folder (with `relay_transformer/` and `generation_config.json`) at dit/assets/demo.

Every stage resumes: a finished stage (its `final/` exists) is skipped, an interrupted one continues from its
last checkpoint, and the folder is written under a temporary name and renamed. Wall times per stage are kept in
WORKDIR/build_times.json and copied into the shipped folder's `build_info.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
STAGES = ("vae", "vae-ft", "base-image", "base", "relay")
TARGET = Path(__file__).resolve().parents[1] / "assets" / "demo"
# What `dit generate` uses when no option overrides it (read from generation_config.json in the folder).
GENERATION_CONFIG = {
    "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 25, "guidance_scale": 4.0, "fps": 8,
    # The relay stage was trained on inputs downscaled 2x in pixels, upscaled and re-encoded: "pixel" gives it
    # the same kind of input at generation time.
    "relay_steps": 10, "relay_start": 500, "relay_upsample": "pixel",
}


def _times(workdir: Path) -> dict[str, float]:
    path = workdir / "build_times.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_times(workdir: Path, times: dict[str, float]) -> None:
    tmp = workdir / ".build_times.json.tmp"
    tmp.write_text(json.dumps(times, indent=2) + "\n")
    os.replace(tmp, workdir / "build_times.json")


def _reset_time(workdir: Path, key: str) -> None:
    times = _times(workdir)
    if times.pop(key, None) is not None:
        _write_times(workdir, times)


def _add_time(workdir: Path, key: str, seconds: float, *, replace: bool = False) -> None:
    times = _times(workdir)
    times[key] = round((0.0 if replace else times.get(key, 0.0)) + seconds, 1)
    _write_times(workdir, times)


def stage_paths(name: str, workdir: Path) -> dict[str, str]:
    """The config keys that place a stage under `workdir` and chain it to the previous stage's output."""
    out = {"output_dir": str(workdir / name)}
    if name in ("base-image", "base", "relay"):
        out["data.cache"] = str(workdir / f"cache-{name}")
    if name == "vae-ft":
        out["model.vae_pretrained"] = str(workdir / "vae" / "final" / "vae")
    if name in ("base-image", "relay"):  # the relay transformer is its own (patch 4), on the same VAE
        out["model.vae_pretrained"] = str(workdir / "vae-ft" / "final" / "vae")
    if name == "base":
        out["model.pretrained"] = str(workdir / "base-image" / "final" / "pipeline")
    return out


def run_stage(name: str, workdir: Path, overrides: dict[str, object] | None = None) -> Path:
    """Train one stage (cache first when its config has one); returns its final/ folder. `overrides`: dotted
    config keys on top of the stage's paths (the tests shrink the runs with them)."""
    from dit.train.config import load_config
    from dit.train.trainer import train

    cfg = load_config(CONFIGS / f"{name}.yaml", overrides={**stage_paths(name, workdir), **(overrides or {})})
    final = Path(cfg.output_dir) / "final"
    if (final / "trainer_state.json").is_file():
        done = json.loads((final / "trainer_state.json").read_text())["step"]
        if done != cfg.train.steps:
            raise ValueError(f"{final} holds {done} steps but configs/demo/{name}.yaml asks for {cfg.train.steps}; "
                             f"move {cfg.output_dir} away to train the stage again")
        print(f"[demo] {name}: done ({final})")
        return final
    if not (Path(cfg.output_dir) / "checkpoints").is_dir():
        _reset_time(workdir, f"{name}_train_s")  # a fresh run: an earlier, abandoned run's time does not count
    if cfg.data.cache is not None and not (Path(cfg.data.cache) / "index.json").is_file():
        from dit.train.cache import build_cache

        print(f"[demo] {name}: building the latent cache {cfg.data.cache}")
        start = time.perf_counter()
        build_cache(cfg)
        # A cache is built in one go (an interrupted build starts over), so its time replaces an earlier one.
        _add_time(workdir, f"{name}_cache_s", time.perf_counter() - start, replace=True)
    print(f"[demo] {name}: training {cfg.train.steps} steps into {cfg.output_dir}")
    start = time.perf_counter()
    final = train(cfg)
    _add_time(workdir, f"{name}_train_s", time.perf_counter() - start)
    return final


def assemble(workdir: Path, target: Path) -> Path:
    """The base pipeline with the relay transformer and the generation defaults, written atomically to target."""
    from dit import load_transformer
    from dit.pipeline import DiTPipeline

    pipe = DiTPipeline.from_pretrained(workdir / "base" / "final" / "pipeline")
    pipe.register_modules(relay_transformer=load_transformer(workdir / "relay" / "final" / "pipeline" / "transformer"))
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    info = {"command": "python -m dit.demo.build", "configs": [f"configs/demo/{s}.yaml" for s in STAGES],
            "wall_seconds": _times(workdir)}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="outputs/demo-build", help="where the stages train (as in the configs)")
    parser.add_argument("--target", default=str(TARGET), help="the assembled pipeline folder")
    parser.add_argument("--stage", choices=STAGES, help="run only this stage")
    args = parser.parse_args(argv)
    if not CONFIGS.is_dir():
        parser.error(f"{CONFIGS} not found: the stage configs are in the repository checkout, not in an installed wheel")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in [args.stage] if args.stage else STAGES:
        run_stage(name, workdir)
    if args.stage is None:
        print(f"[demo] assembled {assemble(workdir, Path(args.target))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
