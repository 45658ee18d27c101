"""Precomputed latents and text embeddings (`dit train CONFIG --build-cache`), read back by data.CacheSource.

Per item: the VAE posterior's mean and std (so training still samples z = mean + std n with its own seeded
noise, exactly as with on-the-fly encoding), the relay stage's low-resolution posterior when the objective is
relay, and the text conditioning tensors. The folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dit.train.config import TrainConfig
from dit.train.data import build_source, cache_fingerprint
from dit.train.models import build_bundle
from dit.train.objectives import low_resolution


ENCODE_BATCH = 32


@torch.no_grad()
def build_cache(cfg: TrainConfig) -> Path:
    """Encode every item of the configured source into cfg.data.cache; returns the folder."""
    if cfg.data.cache is None:
        raise ValueError("data.cache: set a folder to write the cache into")
    target = Path(cfg.data.cache)
    if (target / "index.json").exists():
        raise ValueError(f"data.cache: {str(target)!r} already holds a cache; delete it to rebuild")
    source = build_source(cfg.data, cfg.train.seed, use_cache=False)
    bundle = build_bundle(cfg.model, cfg.objective)
    bundle.check_sizes(source.buckets)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [f"{i:08d}.safetensors" for i in range(len(source))]
    bar = tqdm(total=len(source), desc="cache", unit="item")
    for start in range(0, len(source), ENCODE_BATCH):
        # Items of one bucket are encoded together (the VAE and text encoder see a batch; each item's result
        # equals its own encode up to float rounding), then written one file per item.
        chunk = range(start, min(start + ENCODE_BATCH, len(source)))
        by_bucket: dict[int, list[int]] = {}
        for i in chunk:
            by_bucket.setdefault(source.bucket_of[i], []).append(i)
        for indices in by_bucket.values():
            items = [source[i] for i in indices]
            video = torch.stack([it["video"] for it in items])  # (n, F, 3, H, W)
            mean, std = bundle.encode_posterior(video)
            tensors = {"latent_mean": mean, "latent_std": std}
            if cfg.objective.kind == "relay":
                low_mean, low_std = bundle.encode_posterior(low_resolution(video, cfg.objective.scale_factor))
                tensors.update(low_mean=low_mean, low_std=low_std)
            cond = bundle.encode_text([it["caption"] for it in items], torch.device("cpu"))
            tensors.update({f"cond.{k}": v for k, v in cond.items()})
            for j, i in enumerate(indices):
                save_file({k: v[j].contiguous() for k, v in tensors.items()}, tmp / files[i])
            bar.update(len(indices))
    bar.close()
    empty = bundle.encode_text([""], torch.device("cpu"))
    save_file({k: v[0].contiguous() for k, v in empty.items()}, tmp / "empty_caption.safetensors")
    index = {"buckets": [list(b) for b in source.buckets], "files": files, "bucket_of": list(source.bucket_of),
             "fingerprint": cache_fingerprint(cfg)}
    (tmp / "index.json").write_text(json.dumps(index) + "\n")
    if target.exists():
        target.rmdir()  # an empty folder the user made for it; a non-empty one makes rmdir fail loudly
    os.replace(tmp, target)
    return target
