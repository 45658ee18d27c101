"""Our CogView3-Plus pipeline on a tiny random diffusers folder gives diffusers' images."""

import pytest
import torch

from dit.pipeline import CogView3PlusDiTPipeline, DiTPipeline
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
