"""Exact spatial tiles for the Wan decoder: each tile decoded over the whole video before the next.

Why it is exact: after the mid block every layer of the decoder is local in space (3 x 3 convolutions,
the per-pixel RMS norm, nearest or pixel-shuffle upsampling, 1 x 1 shortcuts), so an output tile
depends only on a window of the mid block's output. A window cut out of a level and run through its
convolutions gets zero padding at its inner edges where the whole frame has neighbours; that spoils
one pixel per convolution from each inner edge, no more. So each level runs on a window that
reaches as far past what the next level needs as it has convolutions (the halo), and is cropped
before its upsampler: nothing spoiled is ever read. Sides on the frame's border are padded with zeros
as in the untiled decode. ``conv_in`` and the mid block (whose attention is global in space) run on
the whole frame, again for each tile, so nothing is kept that grows with the video's length.

Why tiles: the causal convolutions' caches (two frames per convolution at every level) dominate the
untiled decode's memory at large sizes; here they hold one tile's windows, and only one tile's caches
exist at a time. The price is the halos' compute, largest at the low levels (docs/vae3d.md).

Unlike diffusers' tiled decode (``enable_tiling``: overlapping tiles blended linearly, which differs
from the untiled decode near every seam) the result equals the untiled decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .wan_model import WanDecoder3d


@dataclass(frozen=True)
class Span:
    """Rows (or columns) start..stop-1 of one level's frame."""

    start: int
    stop: int

    def grow(self, n: int, size: int) -> Span:
        """n more on each side, within the frame's size."""
        return Span(max(0, self.start - n), min(size, self.stop + n))

    def halve(self) -> Span:
        """The rows of the level below whose nearest 2x upsampling covers these."""
        return Span(self.start // 2, -(-self.stop // 2))

    def double(self) -> Span:
        return Span(2 * self.start, 2 * self.stop)

    def within(self, outer: Span) -> slice:
        """These rows as a slice of a window holding ``outer``."""
        assert outer.start <= self.start and self.stop <= outer.stop, (self, outer)
        return slice(self.start - outer.start, self.stop - outer.start)


@dataclass(frozen=True)
class Window:
    """A rectangle of one level's frame: (rows, cols)."""

    rows: Span
    cols: Span

    def grow(self, n: int, size: tuple[int, int]) -> Window:
        return Window(self.rows.grow(n, size[0]), self.cols.grow(n, size[1]))

    def halve(self) -> Window:
        return Window(self.rows.halve(), self.cols.halve())

    def double(self) -> Window:
        return Window(self.rows.double(), self.cols.double())

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    def view(self, x: torch.Tensor, outer: Window) -> torch.Tensor:
        """This window of x (..., H, W), a tensor holding ``outer``: a view."""
        return x[..., self.rows.within(outer.rows), self.cols.within(outer.cols)]

    def crop(self, x: torch.Tensor, outer: Window) -> torch.Tensor:
        """This window of x as a tensor of its own (x itself when they are the same), so that x can be freed."""
        return self.view(x, outer).contiguous()


@dataclass(frozen=True)
class TilePlan:
    """One output tile of the decoder: ``levels[i]`` is the window level i computes (level 0's: of the
    mid block's output, at the latents' size), ``keep[i]`` what of it a level with an upsampler hands
    on (the upsampler's input), ``tile`` the output rows and columns (the decoder's pixels, before Wan
    2.2's unpatchify)."""

    levels: tuple[Window, ...]
    keep: tuple[Window, ...]
    tile: Window


def level_convs(dec: WanDecoder3d) -> list[int]:
    """The 3 x 3 convolutions in a row on each up level (two per residual block; the last level's
    count includes ``conv_out``). Each spoils one more pixel at a window's inner edge."""
    convs = [2 * len(block.resnets) for block in dec.up_blocks]
    convs[-1] += 1
    return convs


def plan_tile(dec: WanDecoder3d, latent_size: tuple[int, int], tile: Window) -> TilePlan:
    """The windows each level computes for the output ``tile`` of a frame decoded from latents of
    ``latent_size``, working back from the output: a level computes what the next one needs plus one
    pixel per convolution on each side (within the frame); a level's upsampler (a 3 x 3 convolution
    after nearest 2x upsampling) needs one pixel more, at half the resolution."""
    assert all(block.up is not None for block in dec.up_blocks[:-1]) and dec.up_blocks[-1].up is None
    convs = level_convs(dec)
    n = len(convs)
    sizes = [(latent_size[0] * 2**i, latent_size[1] * 2**i) for i in range(n)]
    need = tile.grow(convs[-1], sizes[-1])
    keep: list[Window] = []
    for i in reversed(range(n - 1)):
        keep.insert(0, need.grow(1, sizes[i + 1]).halve())
        need = keep[0].grow(convs[i], sizes[i])
    levels = (need, *(k.double() for k in keep))  # what an upsampler gives is twice what it was given
    return TilePlan(levels, tuple(keep), tile)


def whole_frame(dec: WanDecoder3d, latent_size: tuple[int, int]) -> TilePlan:
    """The untiled decode as a plan: every window the whole frame (its crops change nothing)."""
    scale = 2 ** (len(dec.up_blocks) - 1)
    return plan_tile(dec, latent_size, Window(Span(0, latent_size[0] * scale), Span(0, latent_size[1] * scale)))


def _bounds(size: int, tile: int, step: int) -> list[Span]:
    """size split into ceil(size / tile) spans of near-equal length, each a multiple of ``step``."""
    units = size // step
    count = -(-size // tile)
    cuts = [round(units * k / count) * step for k in range(count + 1)]
    return [Span(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def plan_tiles(dec: WanDecoder3d, latent_size: tuple[int, int], tile_size: tuple[int, int]) -> list[TilePlan]:
    """The tiles of an output frame, each at most ``tile_size`` (the decoder's pixels), in raster order,
    their edges on the latent grid."""
    scale = 2 ** (len(dec.up_blocks) - 1)
    rows = _bounds(latent_size[0] * scale, tile_size[0], scale)
    cols = _bounds(latent_size[1] * scale, tile_size[1], scale)
    return [plan_tile(dec, latent_size, Window(r, c)) for r in rows for c in cols]
