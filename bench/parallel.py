"""Per-rank peak memory and time of context-parallel attention and a whole CogVideoX forward at cp = 1, 2, 4.

A long sequence (default: 226 text + 13 x 28 x 45 = 16,380 video tokens, CogVideoX-like 4 layers x 8 heads x 64).
Each cp degree runs in fresh gloo CPU processes, which make every allocation above 128 KiB a fresh mmap from the
start (glibc M_MMAP_THRESHOLD), so that the resident size follows the live tensors: with glibc's default, freed
heap is reused unseen, and large blocks freed into the heap leave trimmed holes that later small allocations touch
again (megabytes of growth that no live tensor explains). Time is one call after a warm-up; memory is a further
call's peak resident growth (heap trimmed first, peak VmHWM reset). Weights and the full replicated inputs are
excluded; what remains is what context parallelism divides: activations and attention buffers. Also counts the
collectives issued per transformer layer. Prints one JSON line.
Run: `python -m bench.parallel` (`--quick` for a small smoke run; `--mode ulysses|ring|usp`;
`--ring-message-bytes` for the ring's message budget).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch
import torch.distributed as dist

from bench.common import emit


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _live_allocations() -> None:
    """Make the resident size follow live allocations: large ones mmap'd (freed at once), free heap returned."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD; fixing it also stops glibc from raising it dynamically
    libc.malloc_trim(0)


def _measure(fn) -> tuple[float, float]:
    """(seconds of one call, peak resident growth in MB of another under _live_allocations)."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _live_allocations()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident size, to the current one
    fn()
    return round(seconds, 3), round(max(0.0, _status_mb("VmHWM") - before), 1)


def _config(world: int, mode: str, message_bytes: int | None | str):
    from dit.parallel import ContextParallelConfig

    if world == 1:
        return None
    if mode == "ulysses":
        return ContextParallelConfig(ulysses_degree=world, ring_message_bytes=message_bytes)
    if mode == "ring":
        return ContextParallelConfig(ring_degree=world, ring_message_bytes=message_bytes)
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2, ring_message_bytes=message_bytes)


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    _live_allocations()  # from the start: no large heap blocks freed into holes that later calls re-touch
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from dit.models.cogvideox import CogVideoXTransformer3DModel
    from dit.parallel import ContextParallelAttention, ParallelContext, shard, split_sizes

    frames, h, w, text = (3, 16, 16, 16) if args.quick else (13, 56, 90, 226)
    heads, head_dim, layers = (4, 32, 1) if args.quick else (8, 64, 4)
    n_video = frames * (h // 2) * (w // 2)
    length = n_video + text
    cfg = _config(world, args.mode, args.ring_message_bytes)
    g = torch.Generator().manual_seed(0)
    result = {"rank": rank}
    with torch.inference_mode():
        # 1. attention alone on this rank's shard
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
        if cfg is None:
            attn = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c)  # noqa: E731
            ql, kl, vl = q, k, v
        else:
            cp = ContextParallelAttention(ParallelContext(cfg))
            cp.set_sizes(split_sizes(length, world))
            idx = cp.context.shard_index
            ql, kl, vl = (shard(t, 2, idx, world).clone() for t in (q, k, v))
            attn = lambda a, b, c: cp(a, b, c)  # noqa: E731
        del q, k, v
        attn(ql, kl, vl)  # warm-up: first calls allocate communication buffers
        result["attention_s"], result["attention_mb"] = _measure(lambda: attn(ql, kl, vl))
        del ql, kl, vl
        # 2. a whole transformer forward (every rank passes the full inputs)
        with torch.inference_mode(False):  # parameters must be ordinary tensors
            torch.manual_seed(0)
            model = CogVideoXTransformer3DModel(
                num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
                time_embed_dim=128, text_embed_dim=128, num_layers=layers, sample_width=w, sample_height=h,
                sample_frames=4 * frames - 3, max_text_seq_length=text, use_rotary_positional_embeddings=True).eval()
        inputs = dict(hidden_states=torch.randn(1, frames, 16, h, w, generator=g),
                      encoder_hidden_states=torch.randn(1, text, 128, generator=g), timestep=torch.tensor([500]))
        calls = {"all_to_all": 0, "p2p_sends": 0}
        if cfg is not None:
            model.enable_parallelism(cfg)
            import dit.parallel.attention as A

            a2a, batch = A._a2a, dist.batch_isend_irecv

            def count_a2a(*a, **k):
                calls["all_to_all"] += 1
                return a2a(*a, **k)

            def count_sends(ops):  # the ring's messages go through batch_isend_irecv
                calls["p2p_sends"] += sum(op.op is dist.isend for op in ops)
                return batch(ops)

            A._a2a, dist.batch_isend_irecv = count_a2a, count_sends
        model(**inputs)  # warm-up
        calls.update(dict.fromkeys(calls, 0))  # count the measured forward only
        result["forward_s"], result["forward_mb"] = _measure(lambda: model(**inputs))
        result["collectives_per_layer"] = {k: v / (2 * layers) for k, v in calls.items()}  # 2 calls measured
    queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    finally:
        for p in procs:
            if p.is_alive() and p.exitcode is not None:
                p.terminate()
    for p in procs:
        p.join()
    return {"world": world, "attention_mb_max_rank": max(r["attention_mb"] for r in results),
            "forward_mb_max_rank": max(r["forward_mb"] for r in results),
            "attention_s": max(r["attention_s"] for r in results), "forward_s": max(r["forward_s"] for r in results),
            "collectives_per_layer": results[0]["collectives_per_layer"]}


def _message_bytes(text: str) -> int | None | str:
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto, none or a positive byte count, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mode", choices=("ulysses", "ring", "usp"), default="ulysses")
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads, split over the ranks")
    parser.add_argument("--ring-message-bytes", type=_message_bytes, default="auto",
                        help="ContextParallelConfig.ring_message_bytes: auto (default), none, or a byte count")
    args = parser.parse_args()
    rows = [run(w, args) for w in (1, 2, 4)]
    base = rows[0]
    for r in rows:
        r["attention_mem_ratio"] = round(r["attention_mb_max_rank"] / max(base["attention_mb_max_rank"], 1e-9), 3)
        r["forward_mem_ratio"] = round(r["forward_mb_max_rank"] / max(base["forward_mb_max_rank"], 1e-9), 3)
    emit({"bench": "parallel", "mode": args.mode, "ring_message_bytes": args.ring_message_bytes, "quick": args.quick,
          "rows": rows,
          "memory_method": "per rank: peak VmHWM minus VmRSS before the call, allocations > 128 KiB mmap'd "
                           "from the worker's start, heap trimmed (gloo CPU processes)"})


if __name__ == "__main__":
    main()
