"""Procedural shapes dataset: determinism, ranges, motion matches caption, held-out split, strict config."""

import dataclasses

import pytest
import torch

from dit.data.shapes import (BACKGROUND_COLOURS, COLOURS, FOREGROUND_COLOURS, MOTION_PHRASES, MOTIONS, SHAPES, ShapeAttributes,
                             ShapesConfig, ShapesDataset, _min_colour_distance, all_combinations, caption_words,
                             heldout_combinations, make_caption, render_clip, sample_attributes, split_combinations)

SMALL = ShapesConfig(seed=3, length=64, num_frames=5, height=24, width=32, object_size=0.3, travel=0.4)


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float32).view(1, 3, 1, 1) / 255 * 2 - 1


def _centroids(video: torch.Tensor, fg: str, bg: str) -> torch.Tensor:
    """Coverage-weighted centroid (x, y) per frame of the object; (F, 2)."""
    w = (video - _rgb(bg)).norm(dim=1) / (_rgb(fg) - _rgb(bg)).norm()  # (F, H, W) coverage in [0, 1]
    ys = torch.arange(video.shape[2], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(video.shape[3], dtype=torch.float32).view(1, 1, -1)
    n = w.sum((1, 2))
    assert (n > 0).all(), "object missing in some frame"
    return torch.stack([(w * xs).sum((1, 2)) / n, (w * ys).sum((1, 2)) / n], dim=1)


def test_same_seed_and_index_give_identical_samples_in_any_order():
    a, b = ShapesDataset(SMALL), ShapesDataset(SMALL)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"]
    assert not torch.equal(forward[0]["video"], forward[1]["video"])
    other_seed = ShapesDataset(dataclasses.replace(SMALL, seed=4))[0]
    assert not torch.equal(other_seed["video"], forward[0]["video"]) or other_seed["caption"] != forward[0]["caption"]
    assert a[-1]["index"] == len(a) - 1


def test_layout_range_and_collate():
    ds = ShapesDataset(SMALL)
    item = ds[0]
    assert item["video"].shape == (5, 3, 24, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["video"].shape == (2, 5, 3, 24, 32) and len(batch["caption"]) == 2
    assert batch["attributes"]["colour"] == [ds[0]["attributes"]["colour"], ds[1]["attributes"]["colour"]]
    image = ShapesDataset(dataclasses.replace(SMALL, num_frames=1))[0]
    assert image["video"].shape == (1, 3, 24, 32) and image["attributes"]["motion"] == "still"
    assert not any(w in image["caption"] for w in ("moving", "still", "sliding", "going"))


def test_object_stays_inside_and_moves_as_captioned():
    cfg = dataclasses.replace(SMALL, length=60, object_size_jitter=0.2)
    ds = ShapesDataset(cfg)
    for i in range(len(ds)):
        item = ds[i]
        video, attrs = item["video"], item["attributes"]
        differs = (video - _rgb(attrs["background"])).abs().sum(1) > 1e-3  # (F, H, W)
        # Inside: every frame shows the object and no object pixel touches the border.
        assert differs.flatten(1).any(1).all()
        border = torch.cat([differs[:, 0], differs[:, -1], differs[:, :, 0], differs[:, :, -1]], dim=1)
        assert not border.any(), f"sample {i} touches the border: {item['caption']}"
        for field in ("colour", "shape", "background"):
            assert attrs[field] in item["caption"].replace(",", " ").split(), field
        assert any(phrase in item["caption"] for phrase in MOTION_PHRASES[attrs["motion"]])
        c = _centroids(video, attrs["colour"], attrs["background"])
        dx, dy = (c[-1] - c[0]).tolist()
        expected = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1), "still": (0, 0)}[attrs["motion"]]
        travel = cfg.travel * (cfg.width if expected[0] else cfg.height)
        assert dx == pytest.approx(expected[0] * travel, abs=0.25) and dy == pytest.approx(expected[1] * travel, abs=0.25)


def test_position_jitter_narrows_the_start_band_and_changes_nothing_else():
    def draw(jitter: float) -> list:
        return [sample_attributes(dataclasses.replace(SMALL, length=200, position_jitter=jitter), i) for i in range(200)]

    full, centred, narrow = draw(1.0), draw(0.0), draw(0.3)
    for (a, p), (b, q), (c, r) in zip(full, centred, narrow):
        assert a == b == c  # same attributes, template, size: only the start moves
        assert {k: v for k, v in p.items() if k != "start"} == {k: v for k, v in r.items() if k != "start"}
        # 0 centres the path in the frame: the middle of the path is the frame's centre.
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[a.motion]
        dist = SMALL.travel * (SMALL.width if ux else SMALL.height)
        assert q["start"][0] + ux * dist / 2 == pytest.approx(SMALL.width / 2)
        assert q["start"][1] + uy * dist / 2 == pytest.approx(SMALL.height / 2)
        # In between, the uniform draw's offset from the centre, scaled by the jitter.
        for axis in (0, 1):
            assert r["start"][axis] - q["start"][axis] == pytest.approx(0.3 * (p["start"][axis] - q["start"][axis]))
    assert len({p["start"] for _, p in full}) == 200  # 1.0 still draws from the whole free room
    # 1.0 keeps the draws from before position_jitter existed (recorded from that code), so old caches and runs
    # stay reproducible.
    before = {0: (17.873294422267584, 5.089468939650075), 1: (11.511615709457555, 7.678968958857274),
              57: (17.246077895264612, 15.40362959851866), 199: (16.480745634832424, 6.7337722492475525)}
    assert {i: full[i][1]["start"] for i in before} == before


def test_render_rejects_a_path_that_leaves_the_frame():
    attrs = ShapeAttributes("red", "circle", "right", "black")
    with pytest.raises(ValueError, match="leaves the 32x32 frame"):
        render_clip(attrs, num_frames=9, height=32, width=32, start=(20.0, 16.0), travel=0.4)
    with pytest.raises(ValueError, match="colour='blue' equals background='blue'"):
        render_clip(ShapeAttributes("blue", "circle", "right", "blue"))
    with pytest.raises(ValueError, match="shape='star'.*accepted: 'circle'"):
        render_clip(ShapeAttributes("red", "star", "right", "black"))


def test_heldout_split_is_disjoint_covering_and_stable():
    cfg = ShapesConfig()
    combos = all_combinations(cfg)
    held = heldout_combinations(cfg)
    assert all(a.colour != a.background for a in combos)
    assert 0.08 * len(combos) <= len(held) <= 0.12 * len(combos)
    train = split_combinations(cfg, "train")
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(combos)
    assert set(split_combinations(cfg, "heldout")) == held
    for field, values in (("colour", FOREGROUND_COLOURS), ("shape", SHAPES), ("motion", MOTIONS),
                          ("background", BACKGROUND_COLOURS)):
        assert {getattr(a, field) for a in train} == set(values), field
    assert {(a.colour, a.background) for a in train} == {(a.colour, a.background) for a in combos}
    # Samples of the train split never show a held-out combination; the held-out split only those.
    ds = ShapesDataset(dataclasses.replace(cfg, length=2000))
    seen = {sample_attributes(ds.config, i)[0] for i in range(len(ds))}
    assert seen.isdisjoint(held) and len(seen) > 0.9 * len(train)
    hds = dataclasses.replace(cfg, split="heldout", length=300)
    assert {sample_attributes(hds, i)[0] for i in range(300)} <= held
    # Spread over the values (no value loses more than its share + 1), and the demo prompt is always seen.
    for field in ("colour", "shape", "motion", "background"):
        for value in {getattr(a, field) for a in combos}:
            n = sum(getattr(a, field) == value for a in combos)
            assert sum(getattr(a, field) == value for a in held) <= -(-n // 10) + 1, (field, value)
    assert ShapeAttributes("red", "circle", "right", "blue") not in held
    # Independent of the data seed (every run and every evaluation holds out the same combinations).
    assert heldout_combinations(dataclasses.replace(cfg, seed=123)) == held


def test_captions_and_vocabulary():
    attrs = ShapeAttributes("red", "circle", "right", "blue")
    assert make_caption(attrs) == "a red circle moving right on a blue background"
    words = set(caption_words())
    assert {*SHAPES, *FOREGROUND_COLOURS, *BACKGROUND_COLOURS, *MOTIONS, ","} <= words
    assert "{" not in words and "colour" not in words and "motion" not in words
    ds = ShapesDataset(dataclasses.replace(SMALL, length=40))
    captions = {ds[i]["caption"] for i in range(40)}
    for c in captions:
        assert set(c.replace(",", " , ").split()) <= words
    assert len({c.split()[0] for c in captions}) >= 3  # several templates in use


def test_colours_are_well_separated():
    assert _min_colour_distance() >= 120


def test_config_validation_names_value_and_accepted():
    with pytest.raises(ValueError, match=r"num_frames=8 must be 1 \+ 4k"):
        ShapesConfig(num_frames=8)
    with pytest.raises(ValueError, match="colours entry='orange'.*accepted: 'red', 'green'"):
        ShapesConfig(colours=("red", "orange"))
    with pytest.raises(ValueError, match="split='test'.*accepted: 'train', 'heldout', 'all'"):
        ShapesConfig(split="test")
    with pytest.raises(ValueError, match="leave no combination"):
        ShapesConfig(colours=("blue",), backgrounds=("blue",))
    with pytest.raises(ValueError, match="travel=0.7"):
        ShapesConfig(travel=0.7)
    with pytest.raises(ValueError, match=r"position_jitter=1.5 must be in \[0, 1\]"):
        ShapesConfig(position_jitter=1.5)
    with pytest.raises(ValueError, match=r"unknown shapes config key\(s\) \['frames'\]; accepted: seed"):
        ShapesConfig.from_dict({"frames": 9})
    with pytest.raises(ValueError, match="height='32' must be an integer"):
        ShapesConfig.from_dict({"height": "32"})
    cfg = ShapesConfig.from_dict({"num_frames": 13, "shapes": ["circle", "square"], "height": 64, "width": 64})
    assert cfg.shapes == ("circle", "square") and hash(cfg)
    with pytest.raises(ValueError, match="index=64 is out of range"):
        ShapesDataset(SMALL)[64]
