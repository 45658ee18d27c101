"""The demo gallery's layout: prompts per shape row, and the tiling of first / middle / last frames."""

import numpy as np
import pytest

from dit.data.shapes import BACKGROUND_COLOURS, FOREGROUND_COLOURS, MOTIONS, SHAPES
from dit.demo.gallery import COLUMNS, gallery_prompts, tile


def test_rows_are_shapes_and_columns_cover_every_word():
    prompts = gallery_prompts()
    assert len(prompts) == len(SHAPES) and all(len(row) == len(COLUMNS) for row in prompts)
    assert all(shape in p for shape, row in zip(SHAPES, prompts) for p in row)
    colours, motions, backgrounds = zip(*COLUMNS)
    assert set(colours) == set(FOREGROUND_COLOURS) and set(motions) == set(MOTIONS)
    assert set(backgrounds) == set(BACKGROUND_COLOURS)
    assert all(c != b for c, _, b in COLUMNS)


def test_tile_places_first_middle_last_frames_of_each_clip_in_its_cell():
    n, f, h, w = 6, 9, 4, 5
    clips = np.zeros((n, f, h, w, 3), dtype=np.float32)
    for k in range(n):
        for j in range(f):
            clips[k, j] = (k * f + j) / (n * f)  # every frame its own grey
    out = tile(clips, rows=2, gap=1, scale=2)  # 2 rows x 3 cols of (2h, 3 * 2w) cells
    assert out.shape == (2 * (2 * h + 1) - 1, 3 * (3 * 2 * w + 1) - 1, 3)
    for k in range(n):
        r, c = divmod(k, 3)
        top, left = r * (2 * h + 1), c * (6 * w + 1)
        for slot, j in enumerate((0, f // 2, f - 1)):
            cell = out[top:top + 2 * h, left + slot * 2 * w:left + (slot + 1) * 2 * w]
            assert np.all(cell == clips[k, j, 0, 0, 0])
    assert np.all(out[2 * h, :] == 1.0)  # the gap between rows is white


def test_tile_refuses_clips_that_do_not_fill_the_rows():
    with pytest.raises(ValueError, match="do not fill 4 rows"):
        tile(np.zeros((6, 1, 2, 2, 3)), rows=4)


@pytest.mark.parametrize("argv, message", [(["-o", "x.jpg"], "give a .png path"),
                                           (["-o", "x.png", "--scale", "0"], "--scale 0: give an integer >= 1")])
def test_gallery_refuses_bad_options_before_loading(argv, message, capsys):
    from dit.demo.gallery import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
