"""`python -m dit.demo.grid`: the image grid (`--frames 1`) and its option checks."""

import json

import pytest


def test_grid_command_grades_the_image_grid_with_frames_1(capsys):
    """`python -m dit.demo.grid --frames 1` generates one frame per prompt of the image grid (image captions,
    motion "still" only) and grades each."""
    from dit.demo.grid import main

    assert main(["--frames", "1", "--every", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 1 and result["prompts"] == 6  # 110 image prompts, every 20th
    graded = result["seen"]["count"] + result.get("heldout", {}).get("count", 0)
    assert graded == 6 and set(result["seen"]) >= {"colour", "shape", "background"}



@pytest.mark.parametrize("frames, nearest", [(4, 5), (0, 1), (8, 9)])
def test_grid_refuses_a_frame_count_the_vae_cannot_take_before_loading(frames, nearest, capsys):
    from dit.demo.grid import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/nonexistent", "--frames", str(frames)])
    assert exit_info.value.code == 2
    assert f"--frames {frames}: the VAE takes 1 + 4k frames (1, 5, 9, ...); nearest {nearest}" in capsys.readouterr().err
