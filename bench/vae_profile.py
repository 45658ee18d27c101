"""Where vae3d's decode memory goes: resident size over time, attributed to the decoder module running.

Decodes random latents (default config, random weights, as bench/vae.py) while a second process reads this one's
resident size (/proc/PID/statm) every 3 ms; forward pre-hooks on the decoder's modules record which one runs when.
Prints JSON: the decode's peak increase over the resident size after loading, the resident level at the start of
each frame batch (what stays between batches: conv caches, the output, heap slack), and the largest increase
seen while each block ran (mid_block, up_blocks.N, norm_out, conv_out).
Run: `python -m bench.vae_profile [--latent-frames 13] [--size 128]` (about 90 s for 13 latent frames);
prefix glibc/torch allocator variables (MALLOC_MMAP_THRESHOLD_=1048576 THP_MEM_ALLOC_ENABLE=1) to compare them.
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, peak_rss_mb
from bench.vae import _rss_mb, default_config_folder


def _sample(pid: int) -> None:
    """The sampling process: one 'time,MB' line per reading until the decoding process stops it."""
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    while True:
        with open(f"/proc/{pid}/statm") as f:
            print(f"{time.time()},{int(f.read().split()[1]) * page_mb}", flush=True)
        time.sleep(0.003)


def _block(name: str) -> str:
    """decoder module name -> the block it belongs to ('up_blocks.3.resnets.0.conv1' -> 'up_blocks.3')."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "up_blocks" else parts[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent-frames", type=int, default=13)
    ap.add_argument("--size", type=int, default=128, help="output height and width (pixels, a multiple of 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", help="a saved default-config folder to reuse (created if missing)")
    ap.add_argument("--sample", type=int, metavar="PID", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample is not None:
        return _sample(args.sample)
    if args.size % 8 or args.size < 8:
        ap.error(f"--size {args.size}: give a multiple of 8 (e.g. {max(8, args.size // 8 * 8)})")

    import torch

    import vae3d

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vae_profile_"))
    vae = vae3d.load_vae(default_config_folder(Path(args.folder) if args.folder else tmp / "vae"))
    with torch.no_grad():  # make the decoder's mapped weights resident, as bench/vae.py does
        for p in vae.decoder.parameters():
            p.sum()
    events: list[tuple[float, str]] = []
    for name, module in vae.decoder.named_modules():
        if name:
            module.register_forward_pre_hook(lambda m, i, n=name: events.append((time.time(), n)))
    latent = args.size // vae.spatial_compression
    z = torch.randn(1, vae.config.latent_channels, args.latent_frames, latent, latent,
                    generator=torch.Generator().manual_seed(args.latent_frames))
    samples_file = tmp / "samples.txt"
    base = _rss_mb()
    with open(samples_file, "w") as out:  # a file, not a pipe: a full pipe would stall the sampler
        sampler = subprocess.Popen([sys.executable, "-m", "bench.vae_profile", "--sample", str(os.getpid())],
                                   stdout=out)
        time.sleep(0.5)
        try:
            with torch.no_grad():
                vae.decode(z)
        finally:
            sampler.terminate()
            sampler.wait()
    readings = [tuple(map(float, line.split(","))) for line in samples_file.read_text().split()]  # (time, MB)
    times = [t for t, _ in events]
    block_max: dict[str, float] = {}
    for t, mb in readings:
        i = bisect.bisect_right(times, t) - 1
        if i >= 0:
            block = _block(events[i][1])
            block_max[block] = max(block_max.get(block, 0.0), mb - base)  # emitted sorted by name
    # A frame batch starts with the decoder's first convolution; the resident size then is what stayed.
    between = [round(next((mb for t, mb in readings if t >= s), base) - base, 1)
               for s, name in events if name == "conv_in"]
    emit({"bench": "vae_profile", "latent_frames": args.latent_frames, "size": args.size, "threads": args.threads,
          "rss_after_load_mb": round(base, 1), "decode_peak_increase_mb": round(peak_rss_mb() - base, 1),
          "resident_at_batch_start_mb": between,
          "block_max_increase_mb": {k: round(v, 1) for k, v in block_max.items()},
          "allocator_env": {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")
                            if k in os.environ}})


if __name__ == "__main__":
    main()
