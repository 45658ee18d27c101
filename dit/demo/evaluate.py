"""Checks that a generated clip follows its prompt: background colour, object colour, shape and motion direction.

Algorithm (no learned parts, so it cannot share a failure with the model it grades):
1. Smooth each frame with a 3x3 box filter, so per-pixel noise does not look like an object.
2. Background: median colour of the frame borders over all frames -> nearest background palette colour.
3. Object: pixels whose colour is far from the measured background (more than half the largest distance in
   the clip); its colour is the median of the core (more than 3/4 of it) -> nearest foreground palette colour.
4. Motion: the object's centroid per frame; a least-squares line through the centroids gives the displacement
   over the clip; below `still_threshold` (fraction of the frame) it is "still", else the dominant axis.
5. Shape: each candidate shape is drawn with the object's area and centroid and
   compared by least squares with the object's coverage (unsmoothed colours projected on the background ->
   object colour line); the smallest error over up to 5 frames wins.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dit.data.shapes import (BACKGROUND_COLOURS, COLOURS, FOREGROUND_COLOURS, SHAPES, ShapeAttributes, ShapesConfig,
                             all_combinations, heldout_combinations, make_caption, shape_coverage)

ALL_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background", "motion")
SCORED_ATTRIBUTES: tuple[str, ...] = ALL_ATTRIBUTES
# Below this colour distance (RGB in [0, 1], Euclidean) nothing in the clip counts as an object.
MIN_CONTRAST = 0.15


@dataclass(frozen=True)
class ClipEstimate:
    """What the evaluator read from a clip. `colour` / `motion` / `shape` are None when no object was found.

    centroids: per frame (x, y) as (column, row) pixel indices, None where the frame shows no object.
    displacement: (dx, dy) over the whole clip as fractions of width / height (y grows downwards).
    """

    background: str
    colour: str | None
    motion: str | None
    shape: str | None
    centroids: tuple[tuple[float, float] | None, ...]
    displacement: tuple[float, float]
    background_rgb: tuple[float, float, float]
    colour_rgb: tuple[float, float, float] | None
    object_fraction: float

    def score(self, expected: ShapeAttributes | Mapping[str, str], *,
              attributes: Sequence[str] = SCORED_ATTRIBUTES) -> dict[str, bool]:
        """Per-attribute correctness against the prompted attributes (a ShapeAttributes or a mapping; other
        keys are ignored). attributes: which to judge, from ALL_ATTRIBUTES (default: all four)."""
        bad = [a for a in attributes if a not in ALL_ATTRIBUTES]
        if bad or not attributes:
            raise ValueError(f"attributes={list(attributes)!r}; accepted: a non-empty subset of {ALL_ATTRIBUTES}")
        if isinstance(expected, ShapeAttributes):
            expected = dataclasses.asdict(expected)
        missing = [k for k in attributes if k not in expected]
        if missing:
            raise ValueError(f"expected attributes lack {missing}; give {', '.join(attributes)}")
        return {k: getattr(self, k) == expected[k] for k in attributes}


@dataclass(frozen=True)
class GridPrompt:
    """One prompt of the evaluation grid: its attributes, its text, and whether training never saw it."""

    attributes: ShapeAttributes
    prompt: str
    heldout: bool


def prompt_grid(config: ShapesConfig | None = None, *, template: int = 0, phrase: int = 0) -> list[GridPrompt]:
    """Every colour x shape x motion x background combination of `config` (default: the full vocabulary)
    with its caption (template 0 / phrase 0: "a red circle moving right on a blue background") and its
    held-out flag; the held-out set is the one `config` excludes from its train split."""
    config = ShapesConfig() if config is None else config
    held = heldout_combinations(config)
    image = config.num_frames == 1
    return [GridPrompt(a, make_caption(a, template=template, phrase=phrase, image=image), a in held)
            for a in all_combinations(config)]


def summarize_scores(scores: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Success rate per attribute, plus "all" (every attribute right) and "count"."""
    scores = list(scores)
    if not scores:
        raise ValueError("scores is empty; give at least one ClipEstimate.score(...) result")
    out = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    out["count"] = float(len(scores))
    return out


def _to_fhw3(clip: np.ndarray | torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) or (F, H, W, 3) (or one frame without F) in [0, 1] -> float32 (F, H, W, 3)."""
    if isinstance(clip, torch.Tensor):
        clip = clip.detach().cpu().float().numpy()
    arr = np.asarray(clip)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 3:
        arr = arr[None]  # one image -> one frame
    # Frames smaller than 8 pixels are refused, which keeps the two layouts unambiguous.
    if arr.ndim != 4 or not ((arr.shape[1] == 3 and min(arr.shape[2:]) >= 8) or
                             (arr.shape[3] == 3 and min(arr.shape[1:3]) >= 8)):
        raise ValueError(f"clip shape {tuple(arr.shape)} is not accepted; give (F, 3, H, W) or (F, H, W, 3) "
                         "(or one frame (3, H, W) / (H, W, 3)) with H, W >= 8")
    if arr.shape[1] == 3 and arr.shape[3] != 3:
        arr = arr.transpose(0, 2, 3, 1)  # (F, 3, H, W) -> (F, H, W, 3)
    if not np.isfinite(arr).all():
        raise ValueError("clip contains NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.02 or hi > 1.02:
        raise ValueError(f"clip values span [{lo:.3f}, {hi:.3f}]; accepted: [0, 1] floats or uint8 "
                         "(a [-1, 1] model output needs (x + 1) / 2 first)")
    return np.clip(arr, 0.0, 1.0)


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter over H and W of (F, H, W, C), edges replicated."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _nearest(rgb: np.ndarray, names: Sequence[str]) -> str:
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float32) / 255
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


@functools.lru_cache(maxsize=None)
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid u, centroid v) of a shape in its own units (it spans [-1, 1]^2), measured on a grid."""
    n = 256
    cover = shape_coverage(shape, np.array([n / 2]), np.array([n / 2]), n / 2, height=n, width=n, antialias=1)[0]
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5 - n / 2) / (n / 2)  # (n, n) each, object units
    total = cover.sum()
    return float(total / (n / 2) ** 2), float((cover * xs).sum() / total), float((cover * ys).sum() / total)


def _estimate_shape(raw: np.ndarray, mask: np.ndarray, bg_rgb: np.ndarray, fg_rgb: np.ndarray,
                    shapes: Sequence[str], max_frames: int = 5) -> str | None:
    """Least-squares template match of the object's coverage, per frame, against each shape drawn with the
    same area and centroid; the shape with the smallest mean error wins.

    Coverage is the unsmoothed pixel colour projected onto the background -> object colour line (not
    clipped, so noise stays zero-mean), read in a window around the object: smoothing would round a
    small cross into a diamond.
    """
    f, h, w = mask.shape
    axis = fg_rgb - bg_rgb
    if float(axis @ axis) < 1e-4:
        return None
    cover = ((raw - bg_rgb) @ axis) / float(axis @ axis)  # (F, H, W), 0 = background, 1 = object
    frames = [i for i in range(f) if mask[i].sum() >= 3]
    if not frames:
        return None
    frames = [frames[int(j)] for j in np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round()]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # (H, W) each, pixel centres
    errors = {shape: 0.0 for shape in shapes}
    for i in frames:
        # A crop of about twice the object's extent, from the mask, limits the noise summed in (and the work).
        m = mask[i]
        mx, my, half = xs[m].mean(), ys[m].mean(), 1.2 * np.sqrt(m.sum()) + 2
        x0, x1 = max(0, int(mx - half)), min(w, int(np.ceil(mx + half)))
        y0, y1 = max(0, int(my - half)), min(h, int(np.ceil(my + half)))
        c = cover[i, y0:y1, x0:x1]  # (h', w')
        area = c.sum()
        if area <= 1:
            continue
        cx, cy = (c * xs[y0:y1, x0:x1]).sum() / area - x0, (c * ys[y0:y1, x0:x1]).sum() / area - y0
        for shape in shapes:
            unit_area, cu, cv = _shape_geometry(shape)
            radius = float(np.sqrt(area / unit_area))
            drawn = shape_coverage(shape, cx - cu * radius, cy - cv * radius, radius, height=y1 - y0,
                                   width=x1 - x0, antialias=4)[0]
            errors[shape] += float(((drawn - c) ** 2).sum())
    return min(errors, key=errors.get)


def _direction(dx: float, dy: float, still_threshold: float) -> str:
    if max(abs(dx), abs(dy)) < still_threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def evaluate_clip(clip: np.ndarray | torch.Tensor, *, colours: Sequence[str] = FOREGROUND_COLOURS,
                  backgrounds: Sequence[str] = BACKGROUND_COLOURS, shapes: Sequence[str] = SHAPES,
                  still_threshold: float = 0.1) -> ClipEstimate:
    """Estimate background colour, object colour, per-frame centroid and motion of one clip.

    clip: (F, 3, H, W) or (F, H, W, 3), floats in [0, 1] (or uint8); a single frame is read as "still".
    still_threshold: displacement over the clip, as a fraction of the frame, below which the object counts
    as still; about a quarter of the training `travel` (0.4 by default) separates still from moving.
    """
    for name, names, accepted in (("colours", colours, COLOURS), ("backgrounds", backgrounds, COLOURS),
                                  ("shapes", shapes, SHAPES)):
        if not names or any(n not in accepted for n in names):
            raise ValueError(f"{name}={list(names)!r} must be a non-empty list of {', '.join(accepted)}")
    if not 0 < still_threshold < 1:
        raise ValueError(f"still_threshold={still_threshold} must be in (0, 1) (a fraction of the frame)")
    raw = _to_fhw3(clip)  # (F, H, W, 3)
    x = _box3(raw)
    f, h, w, _ = x.shape
    b = max(1, min(h, w) // 16)  # border ring width
    border = np.concatenate([x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3),
                             x[:, :, :b].reshape(-1, 3), x[:, :, -b:].reshape(-1, 3)])  # (N, 3)
    bg_rgb = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg_rgb, axis=-1)  # (F, H, W)
    peak = float(dist.max())
    background = _nearest(bg_rgb, backgrounds)
    if peak < MIN_CONTRAST:
        return ClipEstimate(background, None, None, None, (None,) * f, (0.0, 0.0), tuple(map(float, bg_rgb)), None,
                            0.0)
    mask = dist > 0.5 * peak  # (F, H, W)
    core = dist > 0.75 * peak
    colour_rgb = np.median(x[core], axis=0)
    colour = _nearest(colour_rgb, colours)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W) each
    centroids: list[tuple[float, float] | None] = []
    for m in mask:
        n = int(m.sum())
        centroids.append((float(xs[m].mean()), float(ys[m].mean())) if n else None)
    found = [(i, c) for i, c in enumerate(centroids) if c is not None]
    if f == 1:
        dx = dy = 0.0
        motion: str | None = "still"
    elif len(found) < 2:
        dx = dy = 0.0
        motion = None
    else:
        t = np.asarray([i for i, _ in found], dtype=np.float64)
        cxy = np.asarray([c for _, c in found], dtype=np.float64)  # (N, 2)
        slope = np.polyfit(t, cxy, 1)[0]  # (2,) pixels per frame, least squares
        dx, dy = float(slope[0] * (f - 1) / w), float(slope[1] * (f - 1) / h)
        motion = _direction(dx, dy, still_threshold)
    shape = _estimate_shape(raw, mask, bg_rgb, colour_rgb, shapes)
    return ClipEstimate(background, colour, motion, shape, tuple(centroids), (dx, dy), tuple(map(float, bg_rgb)),
                        tuple(map(float, colour_rgb)), float(mask.mean()))
