"""Our SD3 pipeline on a tiny random diffusers folder gives diffusers' images (same seed and settings)."""

import pytest
import torch

from dit.pipeline import DiTPipeline, SD3DiTPipeline
from tiny import tiny_sd3_pipeline


@pytest.fixture(scope="module", params=[False, True], ids=["static-shift", "dynamic-shift"])
def folders(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    return folder, tiny_sd3_pipeline(folder, dynamic_shift=request.param)


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_same_images_as_diffusers(folders, guidance):
    folder, ref = folders
    ours = DiTPipeline.from_pretrained(folder)
    assert isinstance(ours, SD3DiTPipeline) and type(ours.transformer).__module__ == "dit.models.mmdit"
    kwargs = dict(prompt="a red circle", negative_prompt="blue", height=32, width=32, num_inference_steps=4,
                  guidance_scale=guidance, output_type="np")
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == expected.shape == (1, 32, 32, 3)
    assert abs(got - expected).max() <= 1e-4


def test_bad_size_names_nearest_valid(folders):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="width 34 must be divisible by 4; nearest valid: 32 or 36"):
        ours(prompt="a cat", height=32, width=34, num_inference_steps=1)


def test_zero_size_is_not_the_default(folders):
    folder, _ = folders
    ours = DiTPipeline.from_pretrained(folder)
    for size in ("height", "width"):
        with pytest.raises(ValueError, match=f"{size} must be a positive integer, got 0"):
            ours(prompt="a cat", num_inference_steps=1, **{"height": 32, "width": 32, size: 0})


def test_saved_folder_round_trips(folders, tmp_path):
    from diffusers import DiffusionPipeline

    folder, ref = folders
    DiTPipeline.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    # diffusers loads an SD3 folder without T5 only when told so, ours or its own alike
    back = DiffusionPipeline.from_pretrained(tmp_path / "saved", text_encoder_3=None, tokenizer_3=None)
    assert type(back).__name__ == "StableDiffusion3Pipeline" and type(back.transformer).__module__ == "dit.models.mmdit"
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np")
    a = back(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() <= 1e-4
