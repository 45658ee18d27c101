"""The demo gallery's layout: prompts per shape row, and the tiling of first / middle / last frames."""

import numpy as np
import pytest
import torch

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


def test_gallery_draws_each_prompt_of_the_demo_in_its_cell(tmp_path, capsys):
    """The whole command on the shipped model: a png of the tiled layout whose first and last cells are the
    pipeline's own clips for their prompts and seeds."""
    from PIL import Image

    from dit.demo.gallery import main
    from dit.pipeline import DiTPipeline
    from dit.requests import DEMO_MODEL, generation_defaults, sampling_defaults

    assert main(["-o", str(tmp_path / "g.png"), "--scale", "1", "--seed", "3"]) == 0
    picture = np.asarray(Image.open(tmp_path / "g.png"), dtype=np.float32) / 255
    pipe = DiTPipeline.from_pretrained(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for row in gallery_prompts() for p in row]
    call = sampling_defaults(generation_defaults(DEMO_MODEL))
    for k in (0, len(prompts) - 1):
        clip = pipe(prompt=prompts[k], generator=torch.Generator().manual_seed(3 + k), output_type="np",
                    **call).frames[:1]  # (1, F, H, W, 3)
        _, f, h, w, _ = clip.shape
        r, c = divmod(k, len(COLUMNS))
        cell = picture[r * (h + 2):r * (h + 2) + h, c * (3 * w + 2):c * (3 * w + 2) + 3 * w]
        assert picture.shape == (len(SHAPES) * (h + 2) - 2, len(COLUMNS) * (3 * w + 2) - 2, 3)
        # one prompt alone against the same prompt in the batch of all: equal up to the png's rounding
        np.testing.assert_allclose(cell, tile(clip, 1), atol=2 / 255)
