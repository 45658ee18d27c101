"""Our class-conditional DiT pipeline on tiny diffusers DiTPipeline folders gives diffusers' images (same seed and
settings); class names as diffusers' get_label_ids reads them; saved folders load in diffusers with their labels."""

import pytest
import torch

from dit.pipeline import ClassConditionalDiTPipeline, DiTPipeline
from tiny import tiny_dit_pipeline


@pytest.fixture(scope="module", params=["dpm", "ddim"])
def folders(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"dit-{request.param}")
    ref = tiny_dit_pipeline(folder, scheduler=request.param)
    ref.set_progress_bar_config(disable=True)
    ours = DiTPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return folder, ref, ours


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_same_images_as_diffusers(folders, guidance):
    _, ref, ours = folders
    assert isinstance(ours, ClassConditionalDiTPipeline) and type(ours.transformer).__module__ == "dit.models.dit"
    kwargs = dict(class_labels=[207, 0, 360], guidance_scale=guidance, num_inference_steps=4, output_type="np")
    expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == expected.shape == (3, 16, 16, 3)
    assert abs(got - expected).max() <= 1e-4


def test_labels_are_diffusers_and_unknown_names_suggest_close_ones(folders):
    _, ref, ours = folders
    assert ours.labels == ref.labels
    assert ours.get_label_ids(["white shark", "otter"]) == ref.get_label_ids(["white shark", "otter"]) == [2, 360]
    assert ours.get_label_ids("tabby cat") == [281]  # one name (diffusers would split a string into letters)
    with pytest.raises(ValueError, match=r"unknown class 'golden retrever' \(close matches: 'golden retriever'\)"):
        ours.get_label_ids("golden retrever")


@pytest.mark.parametrize("labels", [[], [1000], [-1], [1.5], "otter", [True]])
def test_bad_class_labels_name_what_is_accepted(folders, labels):
    _, _, ours = folders
    with pytest.raises(ValueError, match="class_labels must be a non-empty list of class ids 0 to 999"):
        ours(class_labels=labels, num_inference_steps=1)


def test_saved_folder_round_trips_with_its_labels(folders, tmp_path):
    from diffusers import DiffusionPipeline

    _, ref, ours = folders
    ours.save_pretrained(tmp_path / "saved")
    back = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(back).__name__ == "DiTPipeline" and type(back.transformer).__module__ == "dit.models.dit"
    assert back.labels == ref.labels and DiTPipeline.from_pretrained(tmp_path / "saved").labels == ref.labels
    back.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[2], num_inference_steps=2, output_type="np")
    a = back(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() <= 1e-4
