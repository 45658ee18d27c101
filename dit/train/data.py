"""Training data: sources (procedural shapes, folders of videos/images with captions, a latent cache), size
buckets, and a deterministic batch stream.

The batch stream is a pure function of (seed, data-parallel rank, batch number): batch k of a run is the same
whether the run was interrupted or not, so the data position is one integer. Ranks of one context-parallel
group share the data-parallel rank and therefore read the same batch.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dit.train.config import DataConfig, TrainConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".gif", ".mov", ".webm", ".avi", ".mkv")
Bucket = tuple[int, int, int]  # (height, width, frames)


# ----------------------------------------------------------------------------------------------------------------
# Sources: item i -> {"video": (F, 3, H, W) in [-1, 1], "caption": str} (or cached latents), plus its bucket
# ----------------------------------------------------------------------------------------------------------------


class ShapesSource:
    """The procedural shapes dataset (dit.data.shapes) at the data config's size, or spread over `data.buckets`
    (item i is rendered at bucket i mod len(buckets): the same clips at several sizes, e.g. to train a VAE that
    serves both a base stage and its relay stage)."""

    def __init__(self, cfg: DataConfig):
        from dit.data import ShapesConfig, ShapesDataset

        self.buckets: list[Bucket] = [tuple(b) for b in cfg.buckets] or [(cfg.height, cfg.width, cfg.frames)]
        try:
            self.datasets = [ShapesDataset(ShapesConfig.from_dict({"height": h, "width": w, "num_frames": f,
                                                                   **cfg.shapes}))
                             for h, w, f in self.buckets]
        except ValueError as e:
            raise ValueError(f"data.shapes: {e}") from None
        self.bucket_of = [i % len(self.buckets) for i in range(len(self.datasets[0]))]

    def __len__(self) -> int:
        return len(self.bucket_of)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.datasets[self.bucket_of[i]][i]
        return {"video": item["video"], "caption": item["caption"]}


def read_captions(cfg: DataConfig, files: list[Path]) -> dict[Path, str]:
    """Captions per media file: `.txt` sidecars, or a CSV (file, caption) / JSONL ({"file", "caption"}) file."""
    folder = Path(cfg.folder)
    if cfg.captions == "txt":
        out = {}
        for f in files:
            side = f.with_suffix(".txt")
            if not side.is_file():
                raise ValueError(f"data.folder: {str(f)!r} has no caption sidecar {side.name!r} (data.captions: txt)")
            out[f] = side.read_text(encoding="utf-8").strip()
        return out
    path = folder / cfg.captions_file
    rows: list[dict[str, Any]] = []
    if cfg.captions == "csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"data.captions_file: {str(path)!r} needs a header with columns file,caption; "
                                 f"got {reader.fieldnames}")
            rows = list(reader)
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"data.captions_file: {path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rows[-1], dict) or not {"file", "caption"} <= set(rows[-1]):
                    raise ValueError(f"data.captions_file: {path}:{n}: expected an object with \"file\" and \"caption\"")
    out = {}
    for row in rows:
        f = (folder / row["file"]).resolve()
        if not f.is_file():
            raise ValueError(f"data.captions_file: {str(path)!r} names {row['file']!r}, which does not exist")
        out[f] = str(row["caption"]).strip()
    return out


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video or image as (N, H, W, 3) uint8."""
    import imageio.v3 as iio

    if path.suffix.lower() in IMAGE_EXTS and path.suffix.lower() != ".webp":
        arr = iio.imread(path)[None]
    else:
        arr = iio.imread(path, index=None)
        arr = arr if arr.ndim == 4 else arr[None]
    if arr.ndim == 3 + 1 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3:  # grey
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def probe(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) from the file's header, without decoding it. For containers that do not store a
    frame count (mp4 through ffmpeg) it is duration x fps, which can be off by one: clips are padded with their
    last frame when they come up short (see FolderSource.__getitem__)."""
    import imageio.v3 as iio

    props = iio.improps(path)
    h, w = int(props.shape[1]), int(props.shape[2])
    if path.suffix.lower() in IMAGE_EXTS and path.suffix.lower() != ".webp":
        return 1, int(props.shape[0]), int(props.shape[1])
    n = props.shape[0]
    if not math.isfinite(n):
        meta = iio.immeta(path)
        n = math.floor(float(meta.get("duration", 0)) * float(meta.get("fps", 0)) + 1e-6)
    return max(int(n), 1), h, w


def choose_bucket(buckets: list[Bucket], height: int, width: int, available_frames: int, stride: int) -> int | None:
    """The bucket nearest in aspect ratio among those whose frame count the clip can fill (longest first)."""
    fits = [i for i, (_, _, f) in enumerate(buckets) if (f - 1) * stride + 1 <= available_frames]
    if not fits:
        return None
    aspect = math.log(width / height)
    return min(fits, key=lambda i: (round(abs(math.log(buckets[i][1] / buckets[i][0]) - aspect), 6), -buckets[i][2]))


def resize_crop(video: Tensor, height: int, width: int) -> Tensor:
    """(F, 3, H, W) -> (F, 3, height, width): scale to cover (antialiased bilinear), then centre crop."""
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top:top + height, left:left + width]


class FolderSource:
    """Videos and images under a folder with captions, each assigned to a size/length bucket."""

    def __init__(self, cfg: DataConfig, seed: int):
        folder = Path(cfg.folder)
        self.cfg, self.seed = cfg, seed
        files = sorted(p.resolve() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS)
        if not files:
            raise ValueError(f"data.folder: {str(folder)!r} holds no images or videos "
                             f"(accepted: {', '.join(IMAGE_EXTS + VIDEO_EXTS)})")
        captions = read_captions(cfg, files)
        self.buckets: list[Bucket] = [tuple(b) for b in cfg.buckets] or [(cfg.height, cfg.width, cfg.frames)]
        self.items: list[tuple[Path, str]] = []
        self.bucket_of: list[int] = []
        self.skipped: list[Path] = []
        for f in files:
            if f not in captions:
                if cfg.captions == "txt":
                    raise AssertionError("txt captions cover every file")
                self.skipped.append(f)
                continue
            n, h, w = probe(f)
            b = choose_bucket(self.buckets, h, w, n, cfg.frame_stride)
            if b is None:
                self.skipped.append(f)
                continue
            self.items.append((f, captions[f]))
            self.bucket_of.append(b)
        if not self.items:
            raise ValueError(f"data.folder: none of the {len(files)} files in {str(folder)!r} has enough frames for "
                             f"any bucket {self.buckets} at frame_stride {cfg.frame_stride}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, caption = self.items[i]
        h, w, f = self.buckets[self.bucket_of[i]]
        frames = read_frames(path)
        span = (f - 1) * self.cfg.frame_stride + 1
        # The clip's start is a pure function of (seed, item): reproducible across restarts.
        start = int(np.random.default_rng([self.seed, i]).integers(max(frames.shape[0] - span, 0) + 1))
        if frames.shape[0] < span:  # the header's frame count was one too many
            frames = np.concatenate([frames, np.repeat(frames[-1:], span - frames.shape[0], axis=0)])
        clip = frames[start:start + span:self.cfg.frame_stride]  # (f, H, W, 3)
        video = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (f, 3, H, W)
        return {"video": resize_crop(video, h, w), "caption": caption}


def _non_default(obj: Any) -> dict[str, Any]:
    """A dataclass's fields whose values differ from their defaults (nested dataclasses likewise): a setting
    written out at its default, or a field added later with a default, leaves a fingerprint unchanged."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if nested := _non_default(value):
                out[f.name] = nested
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default:
            out[f.name] = value
    return out


def _folder_contents(path: str, subfolders: tuple[str, ...] = (".",)) -> str:
    """A digest of what a folder holds (file names, sizes, and the text of its JSON files), not of where it is:
    moving a folder keeps it; retraining a model in place changes it when a size or a config value changes
    (our VAE export rewrites scaling_factor), not when only weight values change."""
    root, digest = Path(path), hashlib.sha256()
    for sub in subfolders:
        base = root / sub
        for p in sorted(base.rglob("*")) if base.is_dir() else ():
            if p.is_file():
                digest.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
                if p.suffix == ".json":
                    digest.update(p.read_bytes())
    return digest.hexdigest()[:16]


# What a cached item reads from a `model.pretrained` pipeline folder: the VAE, the text encoders and tokenizers.
_ENCODER_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                       "tokenizer_3")


def cache_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """Everything a cached item depends on: the data settings (minus the loader's own knobs; a data folder by its
    contents), the encoders (model settings other than the transformer's; model folders by their contents), the
    relay input's scale, and the seed where the source uses it (a folder's frame draws). Settings at their
    defaults are left out. `build_cache` stores it; a cache that does not match is refused."""
    from dit.data import ShapesConfig

    data = _non_default(cfg.data)
    for key in ("cache", "num_workers", "caption_dropout"):
        data.pop(key, None)
    if cfg.data.source == "shapes":
        data.pop("shapes", None)
        if shapes := _non_default(ShapesConfig.from_dict(cfg.data.shapes)):
            data["shapes"] = shapes
    if cfg.data.folder is not None:
        data["folder"] = _folder_contents(cfg.data.folder)
    model = _non_default(cfg.model)
    for key in ("transformer", "transformer_preset", "lora"):
        model.pop(key, None)
    if cfg.model.pretrained is not None:
        model["pretrained"] = _folder_contents(cfg.model.pretrained, _ENCODER_SUBFOLDERS)
    if cfg.model.vae_pretrained is not None:
        model["vae_pretrained"] = _folder_contents(cfg.model.vae_pretrained)
    out: dict[str, Any] = {"data": data, "model": model}
    if cfg.objective.kind == "relay":
        out["relay_scale_factor"] = cfg.objective.scale_factor
    if cfg.data.source == "folder":
        out["seed"] = cfg.train.seed
    # A JSON round trip, so a fingerprint compares equal to the one read back from index.json.
    return json.loads(json.dumps(out))


class _Default:
    """Stands for a setting a fingerprint leaves out because it is at its default."""

    def __repr__(self) -> str:
        return "default"


_DEFAULT = _Default()


def _differences(built: Any, now: Any, prefix: str = "") -> list[str]:
    """'key: cache X, config Y' for every leaf where two fingerprints differ."""
    if isinstance(built, dict) and isinstance(now, dict):
        return [d for k in sorted(set(built) | set(now))
                for d in _differences(built.get(k, _DEFAULT), now.get(k, _DEFAULT), f"{prefix}{k}.")]
    return [] if built == now else [f"{prefix.rstrip('.')}: cache {built!r}, config {now!r}"]



class CacheSource:
    """Precomputed latents (posterior mean and std) and text conditioning, written by `build_cache`.
    `fingerprint` (from `cache_fingerprint`): the run's settings, checked against the ones the cache was built
    with, so a stale cache is an error rather than silently training on other data."""

    def __init__(self, folder: str, fingerprint: dict[str, Any] | None = None):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise ValueError(f"data.cache: {str(self.folder)!r} has no index.json; build it with "
                             "`dit train CONFIG --build-cache`")
        index = json.loads(index_path.read_text())
        if fingerprint is not None and index.get("fingerprint") != fingerprint:
            built = index.get("fingerprint")
            what = ("it records no settings (built before caches did)" if built is None else
                    "it differs in " + "; ".join(_differences(built, fingerprint)))
            raise ValueError(f"data.cache: {str(self.folder)!r} does not match this config: {what}; delete it "
                             "and rebuild (`dit train CONFIG --build-cache`), or set data.cache to a new folder")
        self.buckets: list[Bucket] = [tuple(b) for b in index["buckets"]]
        self.files: list[str] = index["files"]
        self.bucket_of: list[int] = index["bucket_of"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        return {"cached": load_file(self.folder / self.files[i])}

    def empty_caption(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(self.folder / "empty_caption.safetensors")


def build_source(cfg: DataConfig, seed: int, *, use_cache: bool = True,
                 fingerprint: dict[str, Any] | None = None):
    if cfg.cache is not None and use_cache:
        return CacheSource(cfg.cache, fingerprint)
    return ShapesSource(cfg) if cfg.source == "shapes" else FolderSource(cfg, seed)


# ----------------------------------------------------------------------------------------------------------------
# The batch stream
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchStream:
    """Batch k for data-parallel rank r: deterministic, epoch after epoch, one bucket per global batch.

    Each epoch permutes the items (seed, epoch), groups them by bucket in that order, cuts each bucket into
    global batches of batch_size x dp_size (a short remainder is left for that epoch), and shuffles the
    batches. Rank r takes its slice of the global batch.
    """

    bucket_of: tuple[int, ...]
    batch_size: int
    dp_rank: int
    dp_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.batches_per_epoch == 0:
            counts = np.bincount(np.asarray(self.bucket_of))
            raise ValueError(f"train.batch_size: {self.batch_size} x {self.dp_size} data-parallel groups is more than "
                             f"any bucket holds (bucket sizes {counts.tolist()}); lower the batch size or add data")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        counts = np.bincount(np.asarray(self.bucket_of))
        return int(sum(c // self.global_batch for c in counts))

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        chunk = _epoch_batches(self, epoch)[j]
        return chunk[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]


@lru_cache(maxsize=2)
def _epoch_batches(stream: BatchStream, epoch: int) -> list[list[int]]:
    rng = np.random.default_rng([stream.seed, 0x5EED, epoch])
    order = rng.permutation(len(stream.bucket_of))
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(stream.bucket_of[i], []).append(int(i))
    g = stream.global_batch
    batches = [items[s:s + g] for _, items in sorted(by_bucket.items()) for s in range(0, len(items) - g + 1, g)]
    return [batches[i] for i in rng.permutation(len(batches))]


class StreamDataset(Dataset):
    """Map-style dataset over batch numbers: item k is the collated batch k of this rank (for DataLoader workers)."""

    def __init__(self, source, stream: BatchStream):
        self.source, self.stream = source, stream

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, Any]:
        items = [self.source[i] for i in self.stream.batch(k)]
        if "cached" in items[0]:
            keys = items[0]["cached"].keys()
            return {"cached": {key: torch.stack([it["cached"][key] for it in items]) for key in keys}}
        return {"video": torch.stack([it["video"] for it in items]), "caption": [it["caption"] for it in items]}


def make_loader(source, stream: BatchStream, start: int, num_workers: int):
    """Batches start, start + 1, ... of this rank; the start is the saved data position on resume."""
    from torch.utils.data import DataLoader

    class _From(torch.utils.data.Sampler):
        def __iter__(self):
            k = start
            while True:
                yield k
                k += 1

    return DataLoader(StreamDataset(source, stream), batch_size=None, sampler=_From(), num_workers=num_workers,
                      persistent_workers=num_workers > 0)
