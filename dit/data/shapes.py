"""Procedural shapes dataset for the demo model: coloured shapes moving on plain backgrounds, with captions.

Every sample is a pure function of (seed, split, index): sample i of seed s is the same whatever order the
samples are read in, so a trainer restores its data position by restoring its index stream alone.

Layout: a sample's video is a float tensor (F, 3, H, W) in [-1, 1], frames first, like the latents of
diffusers' CogVideoXPipeline (B, F, C, H, W); a batch is (B, F, 3, H, W), and the CogVideoX VAE wants
`video.permute(0, 2, 1, 3, 4)` -> (B, 3, F, H, W). An image is the same with F = 1.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")

# sRGB 0..255. Chosen so that every foreground is at least ~120 (Euclidean, 0..255) from every background
# and from every other foreground; tests check the margin. A colour name means one RGB value everywhere,
# so "blue" is the same blue as an object and as a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "magenta": (220, 50, 220),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
FOREGROUND_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "magenta")
BACKGROUND_COLOURS: tuple[str, ...] = ("black", "gray", "blue", "white")

# Several phrasings per motion and several sentence templates, so the text encoder has to pick out the
# attribute words rather than memorise whole sentences.
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "moving to the left", "sliding left"),
    "right": ("moving right", "moving to the right", "sliding right"),
    "up": ("moving up", "going up", "sliding up"),
    "down": ("moving down", "going down", "sliding down"),
    "still": ("staying still", "not moving", "standing still"),
}
VIDEO_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {motion} on a {background} background",
    "a {colour} {shape} {motion} against a {background} background",
    "{background} background, a {colour} {shape} {motion}",
    "a {shape} in {colour}, {motion}, on {background}",
    "video of a {colour} {shape} {motion} on a {background} background",
)
IMAGE_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} against a {background} background",
    "{background} background, a {colour} {shape}",
    "a {shape} in {colour} on {background}",
    "picture of a {colour} {shape} on a {background} background",
)
SPLITS: tuple[str, ...] = ("train", "heldout", "all")
# Fixed, not the data seed: the held-out combinations must be the same for every training run and every
# evaluation, whatever seed the data stream uses.
_HELDOUT_SALT = "dit-shapes-heldout-v1"
# Tokens as the word tokenizer's pre-tokenizer splits them (tokenizers' Whitespace: \w+|[^\w\s]+).
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class ShapeAttributes:
    """What one sample shows; `motion` is one of MOTIONS ("still" for images)."""

    colour: str
    shape: str
    motion: str
    background: str

    def as_tuple(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.motion, self.background)


# The prompt of `make demo` and the README: it must show a combination the model was trained on.
_ALWAYS_TRAIN = frozenset({ShapeAttributes("red", "circle", "right", "blue")})


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, accepted))}")


def _check_subset(name: str, values: Sequence[str], accepted: Sequence[str]) -> None:
    if not values:
        raise ValueError(f"{name} is empty; give at least one of {', '.join(map(repr, accepted))}")
    for v in values:
        _check_choice(f"{name} entry", v, accepted)
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={list(values)!r} has duplicates")


@dataclass(frozen=True)
class ShapesConfig:
    """Strictly validated settings of the procedural dataset (YAML: `ShapesConfig.from_dict(mapping)`).

    object_size: diameter of the shape as a fraction of min(height, width).
    travel: distance covered over the whole clip, as a fraction of the frame along the motion axis.
    position_jitter: how much of the free room the start position may use, per axis: 1 draws it uniformly from
        everywhere the path fits; 0 centres the path in the frame; in between, a centred band of that fraction.
    antialias: supersampling factor per axis for the coverage mask (1 = hard edges).
    split: "train" excludes the held-out combinations, "heldout" yields only them, "all" yields everything.
    """

    seed: int = 0
    length: int = 10_000
    num_frames: int = 9
    height: int = 32
    width: int = 32
    object_size: float = 0.3
    object_size_jitter: float = 0.0
    travel: float = 0.4
    position_jitter: float = 1.0
    antialias: int = 4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = FOREGROUND_COLOURS
    backgrounds: tuple[str, ...] = BACKGROUND_COLOURS
    motions: tuple[str, ...] = MOTIONS
    split: str = "train"
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen dataclass hashable and comparable.
        for name in ("shapes", "colours", "backgrounds", "motions"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"{name}={value!r} must be a list of names")
            object.__setattr__(self, name, tuple(value))
        for name in ("seed", "length", "num_frames", "height", "width", "antialias"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer")
        for name in ("object_size", "object_size_jitter", "travel", "position_jitter", "heldout_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a number")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.length < 1:
            raise ValueError(f"length={self.length} must be >= 1")
        if self.num_frames < 1 or (self.num_frames - 1) % 4 != 0:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (1, 5, 9, 13, ...): the causal "
                             "VAE compresses time by 4 after the first frame")
        for name in ("height", "width"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 16 pixels")
        if not 1 <= self.antialias <= 16:
            raise ValueError(f"antialias={self.antialias} must be in 1..16")
        if not 0.05 <= self.object_size <= 0.8:
            raise ValueError(f"object_size={self.object_size} must be in [0.05, 0.8] (fraction of the frame)")
        if not 0.0 <= self.position_jitter <= 1.0:
            raise ValueError(f"position_jitter={self.position_jitter} must be in [0, 1] (fraction of the free room)")
        if not 0.0 <= self.object_size_jitter < 0.5:
            raise ValueError(f"object_size_jitter={self.object_size_jitter} must be in [0, 0.5)")
        largest = self.object_size * (1 + self.object_size_jitter)
        if not 0.0 <= self.travel or largest + self.travel > 0.95:
            raise ValueError(f"travel={self.travel} must be >= 0 and object_size * (1 + jitter) + travel <= 0.95 "
                             f"(here {largest:.3f} + {self.travel}) so the object stays inside the frame")
        _check_subset("shapes", self.shapes, SHAPES)
        _check_subset("colours", self.colours, FOREGROUND_COLOURS)
        _check_subset("backgrounds", self.backgrounds, BACKGROUND_COLOURS)
        _check_subset("motions", self.motions, MOTIONS)
        _check_choice("split", self.split, SPLITS)
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in [0, 0.5]")
        if not all_combinations(self):
            raise ValueError(f"colours={list(self.colours)} and backgrounds={list(self.backgrounds)} leave no "
                             "combination: an object never has its background's colour")
        if self.split == "heldout" and not heldout_combinations(self):
            raise ValueError(f"split='heldout' but heldout_fraction={self.heldout_fraction} holds nothing out")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesConfig:
        """Build from a parsed YAML mapping; an unknown key is an error naming it and the accepted keys."""
        if not isinstance(data, Mapping):
            raise ValueError(f"shapes config must be a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown shapes config key(s) {unknown}; accepted: {', '.join(known)}")
        return cls(**data)

    @property
    def effective_motions(self) -> tuple[str, ...]:
        """Images (num_frames = 1) cannot show motion, so they use "still" only."""
        return ("still",) if self.num_frames == 1 else self.motions


# ---------------------------------------------------------------------------------------------------------
# Combinations, held-out split, captions, vocabulary
# ---------------------------------------------------------------------------------------------------------

def all_combinations(config: ShapesConfig) -> list[ShapeAttributes]:
    """Every (colour, shape, motion, background) allowed by the config; an object never matches its background."""
    return [ShapeAttributes(c, s, m, b)
            for c in config.colours for s in config.shapes for m in config.effective_motions
            for b in config.backgrounds if c != b]


def _combo_rank(attrs: ShapeAttributes) -> str:
    # A hash of the names, not an index: the held-out set of a combination does not change when other
    # vocabulary entries are added or removed, only the number held out does.
    return hashlib.sha256(("|".join((_HELDOUT_SALT, *attrs.as_tuple()))).encode()).hexdigest()


@functools.lru_cache(maxsize=32)
def heldout_combinations(config: ShapesConfig) -> frozenset[ShapeAttributes]:
    """Deterministic ~heldout_fraction of the combinations, excluded from training.

    Chosen greedily in hash order, skipping any combination whose removal would leave some attribute value
    (a colour, shape, motion or background) or some (colour, background) pair without training examples
    (the held-out set tests composition of things the model has seen, never an unseen word), or would hold
    out more than its share (fraction, rounded up, + 1) of one value's combinations, which keeps the
    held-out set spread over all values. The demo's default prompt is never held out.
    """
    combos = all_combinations(config)
    target = int(round(config.heldout_fraction * len(combos)))
    keys = lambda a: [(0, a.colour), (1, a.shape), (2, a.motion), (3, a.background), (4, (a.colour, a.background))]
    remaining: dict[tuple[int, Any], int] = {}
    for a in combos:
        for k in keys(a):
            remaining[k] = remaining.get(k, 0) + 1
    cap = {k: math.ceil(config.heldout_fraction * n - 1e-9) + 1 for k, n in remaining.items() if k[0] < 4}
    held: set[ShapeAttributes] = set()
    for a in sorted(combos, key=_combo_rank):
        if len(held) >= target:
            break
        if a in _ALWAYS_TRAIN or any(remaining[k] <= 1 for k in keys(a)) or \
                any(cap[k] <= 0 for k in keys(a)[:4]):
            continue
        held.add(a)
        for k in keys(a):
            remaining[k] -= 1
        for k in keys(a)[:4]:
            cap[k] -= 1
    return frozenset(held)


def split_combinations(config: ShapesConfig, split: str | None = None) -> list[ShapeAttributes]:
    """The combinations a split draws from, in a fixed order (split defaults to config.split)."""
    split = config.split if split is None else split
    _check_choice("split", split, SPLITS)
    return list(_split_combinations(config, split))


@functools.lru_cache(maxsize=32)
def _split_combinations(config: ShapesConfig, split: str) -> tuple[ShapeAttributes, ...]:
    combos = all_combinations(config)
    if split == "all":
        return tuple(combos)
    held = heldout_combinations(config)
    return tuple(a for a in combos if (a in held) == (split == "heldout"))


def make_caption(attrs: ShapeAttributes, *, template: int = 0, phrase: int = 0, image: bool = False) -> str:
    """Caption from a template; template 0 / phrase 0 is the canonical prompt, e.g.
    "a red circle moving right on a blue background". `image=True` uses the motion-free templates."""
    _check_choice("colour", attrs.colour, FOREGROUND_COLOURS)
    _check_choice("shape", attrs.shape, SHAPES)
    _check_choice("motion", attrs.motion, MOTIONS)
    _check_choice("background", attrs.background, BACKGROUND_COLOURS)
    templates = IMAGE_TEMPLATES if image else VIDEO_TEMPLATES
    phrases = MOTION_PHRASES[attrs.motion]
    if not 0 <= template < len(templates):
        raise ValueError(f"template={template} must be in 0..{len(templates) - 1}")
    if not 0 <= phrase < len(phrases):
        raise ValueError(f"phrase={phrase} must be in 0..{len(phrases) - 1}")
    return templates[template].format(colour=attrs.colour, shape=attrs.shape, motion=phrases[phrase],
                                      background=attrs.background)


def caption_words() -> list[str]:
    """Every token a caption can contain (lower-case words and punctuation), sorted: the word vocabulary.

    Covers every attribute value and template, not a config's subset, so one tokenizer serves any config.
    """
    empty = dict(colour="", shape="", motion="", background="")
    texts = [*(t.format(**empty) for t in (*VIDEO_TEMPLATES, *IMAGE_TEMPLATES)), *SHAPES, *COLOURS,
             *(p for phrases in MOTION_PHRASES.values() for p in phrases)]
    return sorted({w for text in texts for w in _WORD_RE.findall(text.lower())})


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------

def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object coordinates (u right, v down, the shape spans [-1, 1] on both axes)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.85) & (av <= 0.85)  # a bit smaller, so its area is close to the circle's
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":  # apex up, base down
        return (v <= 0.9) & (au <= (v + 0.9) / 1.8)
    if shape == "cross":
        return ((au <= 1.0) & (av <= 0.34)) | ((av <= 1.0) & (au <= 0.34))
    raise ValueError(f"shape={shape!r} is not supported; accepted: {', '.join(map(repr, SHAPES))}")


def shape_coverage(shape: str, cx: np.ndarray, cy: np.ndarray, radius: float, *, height: int, width: int,
                   antialias: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at (cx[f], cy[f]) (pixels) with half-size `radius`:
    float32 (F, H, W), by supersampling `antialias`^2 points per pixel."""
    cx, cy = np.atleast_1d(np.asarray(cx, dtype=np.float64)), np.atleast_1d(np.asarray(cy, dtype=np.float64))
    s = antialias
    out = np.zeros((len(cx), height, width), dtype=np.float32)
    for f, (x, y) in enumerate(zip(cx.tolist(), cy.tolist())):
        # Only the pixels of the shape's bounding box [c - r, c + r] can be covered.
        x0, x1 = max(0, int(np.floor(x - radius))), min(width, int(np.ceil(x + radius)))
        y0, y1 = max(0, int(np.floor(y - radius))), min(height, int(np.ceil(y + radius)))
        if x1 <= x0 or y1 <= y0:
            continue
        u = ((x0 + (np.arange((x1 - x0) * s) + 0.5) / s) - x) / radius  # (w'*s,) object units
        v = ((y0 + (np.arange((y1 - y0) * s) + 0.5) / s) - y) / radius  # (h'*s,)
        inside = _shape_mask(shape, u[None, :], v[:, None])  # (h'*s, w'*s)
        out[f, y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3), dtype=np.float32)
    return out  # (F, H, W)


def _unit_vector(motion: str) -> tuple[float, float]:
    return {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
            "still": (0.0, 0.0)}[motion]


def render_clip(attrs: ShapeAttributes, *, num_frames: int = 9, height: int = 32, width: int = 32,
                object_size: float = 0.3, travel: float = 0.4, start: tuple[float, float] | None = None,
                antialias: int = 4) -> Tensor:
    """Render explicit attributes to a clip (F, 3, H, W) in [-1, 1].

    start: centre (x, y) of the object in the first frame, in pixels; None centres the path of the motion in
    the frame. Raises ValueError when the object would leave the frame at any frame.
    """
    for name, value, accepted in (("colour", attrs.colour, FOREGROUND_COLOURS), ("shape", attrs.shape, SHAPES),
                                  ("motion", attrs.motion, MOTIONS),
                                  ("background", attrs.background, BACKGROUND_COLOURS)):
        _check_choice(name, value, accepted)
    if attrs.colour == attrs.background:
        raise ValueError(f"colour={attrs.colour!r} equals background={attrs.background!r}; the object would vanish")
    if num_frames < 1 or height < 1 or width < 1 or antialias < 1:
        raise ValueError(f"num_frames={num_frames}, height={height}, width={width}, antialias={antialias} "
                         "must all be >= 1")
    radius = object_size * min(height, width) / 2
    ux, uy = _unit_vector(attrs.motion)
    dist = travel * (width if ux else height) if num_frames > 1 else 0.0  # pixels over the whole clip
    if start is None:
        start = (width / 2 - ux * dist / 2, height / 2 - uy * dist / 2)
    x0, y0 = start
    # numpy, not torch: these arrays are small, and torch's intra-op threads cost more than the work here.
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    cx = x0 + ux * dist * t  # (F,)
    cy = y0 + uy * dist * t
    # The shape fills [-1, 1] in object coordinates, so the box [c - r, c + r] must stay within the frame.
    if (cx - radius < -1e-6).any() or (cx + radius > width + 1e-6).any() or \
            (cy - radius < -1e-6).any() or (cy + radius > height + 1e-6).any():
        raise ValueError(f"start={start}, object_size={object_size}, travel={travel}: the object leaves the "
                         f"{width}x{height} frame")
    cover = shape_coverage(attrs.shape, cx, cy, radius, height=height, width=width, antialias=antialias)
    fg = np.asarray(COLOURS[attrs.colour], dtype=np.float32).reshape(1, 3, 1, 1) / 255
    bg = np.asarray(COLOURS[attrs.background], dtype=np.float32).reshape(1, 3, 1, 1) / 255
    video = torch.from_numpy(bg + (fg - bg) * cover[:, None])  # (F, 3, H, W) in [0, 1]
    return video * 2 - 1


def sample_attributes(config: ShapesConfig, index: int) -> tuple[ShapeAttributes, dict[str, Any]]:
    """The attributes and rendering parameters of sample `index`: a pure function of (config, index)."""
    if not 0 <= index < config.length:
        raise ValueError(f"index={index} is out of range for length={config.length}")
    # SeedSequence over (seed, split, index): independent streams per sample, no shared state.
    split_id = SPLITS.index(config.split)
    rng = np.random.default_rng([config.seed, split_id, index])
    combos = _split_combinations(config, config.split)
    attrs = combos[int(rng.integers(len(combos)))]
    image = config.num_frames == 1
    templates = IMAGE_TEMPLATES if image else VIDEO_TEMPLATES
    template = int(rng.integers(len(templates)))
    phrase = int(rng.integers(len(MOTION_PHRASES[attrs.motion])))
    size = config.object_size * (1 + config.object_size_jitter * (2 * rng.random() - 1))
    radius = size * min(config.height, config.width) / 2
    ux, uy = _unit_vector(attrs.motion)
    dist = config.travel * (config.width if ux else config.height) if not image else 0.0
    # Start anywhere such that the whole path keeps the object inside: along the motion axis the free range
    # shrinks by the travel distance; a margin of one pixel keeps antialiased edges off the border.
    # (Less than a pixel when the config leaves less room.)
    path_x, path_y = abs(ux) * dist, abs(uy) * dist
    mx = min(1.0, max(0.0, config.width - 2 * radius - path_x) / 2)
    my = min(1.0, max(0.0, config.height - 2 * radius - path_y) / 2)
    lo_x = radius + mx + max(0.0, -ux * dist)
    hi_x = config.width - radius - mx - max(0.0, ux * dist)
    lo_y = radius + my + max(0.0, -uy * dist)
    hi_y = config.height - radius - my - max(0.0, uy * dist)
    assert lo_x <= hi_x + 1e-9 and lo_y <= hi_y + 1e-9, "config validation should guarantee the path fits"
    # Two draws whatever position_jitter is, so every other parameter of sample i stays the same.
    u = rng.random(2)
    if config.position_jitter != 1.0:  # 1.0 keeps the uniform draw bit for bit
        u = 0.5 + (u - 0.5) * config.position_jitter
    x0 = float(lo_x + (hi_x - lo_x) * u[0])
    y0 = float(lo_y + (hi_y - lo_y) * u[1])
    params = dict(template=template, phrase=phrase, object_size=size, start=(x0, y0), travel=config.travel)
    return attrs, params


class ShapesDataset(Dataset):
    """Map-style dataset: item i -> {"video": (F, 3, H, W) float32 in [-1, 1], "caption": str,
    "attributes": {"colour", "shape", "motion", "background"}, "index": i}."""

    def __init__(self, config: ShapesConfig | None = None):
        self.config = ShapesConfig() if config is None else config
        if not isinstance(self.config, ShapesConfig):
            raise ValueError(f"config must be a ShapesConfig, got {type(self.config).__name__}")

    def __len__(self) -> int:
        return self.config.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        c = self.config
        attrs, p = sample_attributes(c, index)
        video = render_clip(attrs, num_frames=c.num_frames, height=c.height, width=c.width,
                            object_size=p["object_size"], travel=p["travel"], start=p["start"],
                            antialias=c.antialias)
        caption = make_caption(attrs, template=p["template"], phrase=p["phrase"], image=c.num_frames == 1)
        return {"video": video, "caption": caption, "attributes": dataclasses.asdict(attrs), "index": index}


def _min_colour_distance() -> float:
    """Smallest RGB distance (0..255) between a foreground and a background or another foreground."""
    d = math.inf
    for f in FOREGROUND_COLOURS:
        for o in (*BACKGROUND_COLOURS, *FOREGROUND_COLOURS):
            if o != f:
                d = min(d, math.dist(COLOURS[f], COLOURS[o]))
    return d
