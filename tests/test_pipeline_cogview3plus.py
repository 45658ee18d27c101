"""Our CogView3-Plus pipeline on a tiny random diffusers folder gives diffusers' images."""

import pytest
import torch

from dit.pipeline import CogView3PlusDiTPipeline, DiTPipeline, NonFiniteLatentsError
from tiny import tiny_cogview3plus_pipeline


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_same_images_as_diffusers(tmp_path, scheduler):
    ref = tiny_cogview3plus_pipeline(tmp_path, scheduler=scheduler)
    ours = DiTPipeline.from_pretrained(tmp_path)
    assert isinstance(ours, CogView3PlusDiTPipeline)
    for guidance in (1.0, 5.0):
        kwargs = dict(prompt="a red circle", negative_prompt="blue", height=32, width=32, num_inference_steps=4,
                      guidance_scale=guidance, output_type="np", max_sequence_length=16)
        expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
        got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
        assert got.shape == expected.shape == (1, 32, 32, 3)
        assert abs(got - expected).max() <= 1e-4, guidance


def test_zero_size_and_non_finite_latents_are_errors(tmp_path):
    tiny_cogview3plus_pipeline(tmp_path)
    ours = DiTPipeline.from_pretrained(tmp_path)
    call = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                max_sequence_length=16)
    for size in ("height", "width"):  # 0 is not "the default size"
        with pytest.raises(ValueError, match=f"{size} must be a positive integer, got 0"):
            ours(**dict(call, **{size: 0}))
    with pytest.raises(NonFiniteLatentsError, match=r"non-finite \(NaN or inf\) at step 1 of 2") as info:
        ours(**call, guidance_scale=1e308)
    assert (info.value.step, info.value.total) == (1, 2)
