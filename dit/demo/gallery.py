"""A picture of what the demo model draws: `python -m dit.demo.gallery -o docs/demo_gallery.png [--model F]`.

One row per shape, one column per (colour, motion, background) of COLUMNS; each cell is the first, middle and
last frame of the generated clip side by side, so the shape and the motion both show. Prompts are the grid's
canonical captions and seeds are fixed, so a rebuilt model's gallery is comparable with the last one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dit.data.shapes import SHAPES, ShapeAttributes, make_caption

# (colour, motion, background): every colour, motion and background at least once.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("red", "right", "blue"), ("yellow", "up", "black"), ("white", "left", "gray"),
    ("green", "down", "white"), ("magenta", "still", "black"), ("blue", "right", "white"),
)


def gallery_prompts(columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> list[list[str]]:
    """The prompts, rows (shapes) of columns: "a red circle moving right on a blue background", ..."""
    return [[make_caption(ShapeAttributes(c, s, m, b)) for c, m, b in columns] for s in SHAPES]


def tile(clips: np.ndarray, rows: int, *, gap: int = 2, scale: int = 1) -> np.ndarray:
    """clips (rows * cols, F, H, W, 3) in [0, 1] -> (rows (H s + gap) - gap, cols (3 W s + gap) - gap, 3) in
    [0, 1]: the first, middle and last frame of each clip in its cell, cells separated by `gap` white pixels."""
    n, f, h, w, _ = clips.shape
    if rows < 1 or n % rows:
        raise ValueError(f"{n} clips do not fill {rows} rows")
    cols = n // rows
    frames = clips[:, [0, f // 2, f - 1]]  # (N, 3, H, W, 3)
    cells = frames.transpose(0, 2, 1, 3, 4).reshape(n, h, 3 * w, 3)  # frames side by side
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscale
    ch, cw = cells.shape[1] + gap, cells.shape[2] + gap
    out = np.ones((rows * ch - gap, cols * cw - gap, 3), dtype=np.float32)
    for k, cell in enumerate(cells):
        r, c = divmod(k, cols)
        out[r * ch:r * ch + cell.shape[0], c * cw:c * cw + cell.shape[1]] = cell
    return out


def main(argv: list[str] | None = None) -> int:
    from dit.outputs import write_image
    from dit.pipeline import DiTPipeline
    from dit.requests import DEMO_MODEL, generation_defaults, sampling_defaults

    parser = argparse.ArgumentParser(prog="python -m dit.demo.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="the png to write")
    parser.add_argument("--model", default=str(DEMO_MODEL), help="pipeline folder (default: the embedded demo)")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscale of every frame")
    parser.add_argument("--seed", type=int, default=0, help="cell k draws its noise from seed + k")
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error(f"--output {args.output!r}: give a .png path")
    if args.scale < 1:
        parser.error(f"--scale {args.scale}: give an integer >= 1 (1 keeps the frames' size)")
    defaults = generation_defaults(Path(args.model))
    pipe = DiTPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for row in gallery_prompts() for p in row]
    frames = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(args.seed + k) for k in range(len(prompts))],
                  output_type="np", **sampling_defaults(defaults)).frames
    picture = tile(np.asarray(frames), len(SHAPES), scale=args.scale)  # (rows, cols) of (F, H, W, 3) cells
    write_image(picture, Path(args.output))
    print(f"wrote {args.output} ({picture.shape[1]}x{picture.shape[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
