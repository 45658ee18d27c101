"""Attention backends: selection (explicit, diffusers' names, "auto"), clear errors where a kernel is missing or
cannot run a call, each kernel's layout and log-sum-exp through the one attention function, the ring's LSE merge
with a chosen kernel, and the NCCL discipline of the context-parallel collectives (checked on gloo).

No GPU here: the external kernels (flash_attn 2 / 3, SageAttention, xformers) are stood in by fakes with their
packages' call signatures and layouts, computed by the fp32 reference, and torch's CUDA kernels are called on the
meta device, where their shapes (the lse's padding and trailing dims) are real. bench/gpu.py runs them on CUDA.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import dit.attention as A
from dit.attention import attention, attention_lse, resolve_backend
from dit.models.cogvideox import CogVideoXTransformer3DModel  # diffusers imported before the fake packages
from tests.distributed import run_distributed

B, H, L, D = 2, 3, 10, 16


def _qkv(dtype=torch.float32, length=L, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=g).to(device, dtype) for _ in range(3)]


def _reference(q, k, v, scale=None):
    logits = (q.double() @ k.double().transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    lse = torch.logsumexp(logits, -1)
    return ((logits - lse[..., None]).exp() @ v.double()), lse


# ------------------------------------------------------------------------------------------ fake packages


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     return_attn_probs=False):
    """flash_attn 2's signature: (B, L, H, D) in and out; with return_attn_probs (out, lse (B, H, L), S)."""
    assert q.dim() == 4 and q.stride(-1) == 1 and not causal
    out, lse = _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse.float(), None) if return_attn_probs else out


def _flash3_func(q, k, v, softmax_scale=None, causal=False):
    """An FA3 build without return_attn_probs: always (out, lse)."""
    return _flash_attn_func(q, k, v, softmax_scale=softmax_scale, return_attn_probs=True)[:2]


def _sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False):
    assert tensor_layout == "HND"
    out, lse = _reference(q, k, v, sm_scale)
    return (out.to(q.dtype), lse.float()) if return_lse else out.to(q.dtype)


def _xformers_attention(q, k, v, attn_bias=None, scale=None):
    assert attn_bias is None
    return _flash_attn_func(q, k, v, softmax_scale=scale)


def _xformers_partial(q, k, v, scale=None):
    out, lse, _ = _flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse


@pytest.fixture
def fake_kernels(monkeypatch):
    """flash_attn, flash_attn_interface, sageattention and xformers as fakes, each kernel allowed on the CPU."""
    xops = types.ModuleType("xformers.ops")
    xops.memory_efficient_attention = _xformers_attention
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.memory_efficient_attention_partial = _xformers_partial
    xops.fmha = fmha
    xformers = types.ModuleType("xformers")
    xformers.ops = xops
    modules = {"flash_attn": types.SimpleNamespace(flash_attn_func=_flash_attn_func),
               "flash_attn_interface": types.SimpleNamespace(flash_attn_func=_flash3_func),
               "sageattention": types.SimpleNamespace(sageattn=_sageattn),
               "xformers": xformers, "xformers.ops": xops, "xformers.ops.fmha": fmha}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("flash", "flash3", "sage", "xformers"):
        monkeypatch.setitem(A.KERNELS, name, dataclasses.replace(A.KERNELS[name], devices=("cpu", "cuda")))
    monkeypatch.setattr(A, "_INSTALLED", {})
    monkeypatch.setattr(A, "_FUNCTIONS", {})
    monkeypatch.setattr(A, "_TAKES", {})
    yield


@pytest.fixture
def no_external(monkeypatch):
    """This process as if no external kernel package were installed (whatever the machine has)."""
    state = {name: None for name in ("sdpa", "math")}
    state.update({name: f"{name} is not importable (test)" for name in ("flash", "flash3", "sage", "xformers")})
    state.update({name: "this torch build has no CUDA (test)" for name in ("sdpa_flash", "sdpa_cudnn",
                                                                           "sdpa_efficient")})
    monkeypatch.setattr(A, "_INSTALLED", state)


# --------------------------------------------------------------------------------------------- selection


def test_names_aliases_and_errors(no_external):
    assert A.canonical("_native_cudnn") == "sdpa_cudnn" and A.canonical("native") == "sdpa"
    assert resolve_backend(None) is None and resolve_backend("auto") == "auto" and resolve_backend("math") == "math"
    fn = lambda q, k, v, *, mask, scale: q  # noqa: E731 - a callable backend passes through
    assert resolve_backend(fn) is fn
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash9'; accepted: auto, sdpa"):
        resolve_backend("flash9")
    for name in ("flash", "flash3", "sage", "xformers", "sdpa_flash", "_flash_3"):
        with pytest.raises(ValueError, match=r"was selected but .*; installed here: auto, sdpa, math"):
            resolve_backend(name)
    assert A.installed_backends() == ["sdpa", "math"]


def test_a_kernel_that_cannot_run_the_call_says_why(monkeypatch, no_external):
    A._INSTALLED.update(sdpa_flash=None, sdpa_cudnn=None)  # as on a CUDA build
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'sdpa_flash' cannot run this call: it runs on cuda tensors, got cpu.*"
                                         r"backends that can: sdpa, math, or 'auto'"):
        attention(q, k, v, backend="sdpa_flash")
    q, k, v = _qkv(device="meta")
    with pytest.raises(ValueError, match=r"takes float16 or bfloat16, got torch.float32"):
        attention(q, k, v, backend="sdpa_flash")
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    mask = torch.ones(1, 1, L, L, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="takes no attention mask"):
        attention(q, k, v, mask=mask, backend="sdpa_flash")
    wide = torch.empty(B, H, L, 192, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="head dims up to 128, got 192"):
        attention(wide, wide, wide, backend="sdpa_cudnn")


def test_auto_picks_the_fastest_that_runs(fake_kernels):
    q, k, v = _qkv(torch.bfloat16)
    assert A._auto(q, k, v, None).name == "flash3"  # FlashAttention 3 first, when it runs
    assert A._auto(q.float(), k.float(), v.float(), None).name == "sdpa"  # fp32: no flash kernel takes it
    assert A._auto(q, k, v, torch.ones(L, L, dtype=torch.bool)).name == "sdpa"  # a mask: torch's dispatch
    A._INSTALLED["flash3"] = "not here"
    assert A._auto(q, k, v, None).name == "flash"
    torch.testing.assert_close(attention(q, k, v, backend="auto"), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-2, rtol=0)
    assert A._auto(*_qkv(), None).name == "sdpa"  # never the approximate SageAttention


@pytest.mark.parametrize("name", ["flash", "flash3", "sage", "xformers", "sdpa", "math"])
def test_each_kernel_through_attention_and_attention_lse(fake_kernels, name):
    q, k, v = _qkv(torch.bfloat16)
    ref, ref_lse = _reference(q, k, v, 0.3)
    out = attention(q, k, v, scale=0.3, backend=name)
    assert out.shape == (B, H, L, D) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)
    out, lse = attention_lse(q, k, v, scale=0.3, backend=name)
    assert out.shape == (B, H, L, D) and lse.shape == (B, H, L) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa"])
def test_torch_cuda_kernels_give_out_and_lse_shapes(monkeypatch, name):
    """torch's private flash / efficient / cuDNN ops on the meta device: the efficient kernel pads its lse (cut
    back to Lq here), cuDNN's has a trailing 1 on recent torch (reshaped)."""
    monkeypatch.setattr(A, "_INSTALLED", {n: None for n in A.KERNELS})
    q = torch.empty(B, H, 50, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(B, H, 70, 64, dtype=torch.bfloat16, device="meta")
    out, lse = attention_lse(q, k, k, backend=name)
    assert out.shape == (B, H, 50, 64) and lse.shape == (B, H, 50) and lse.dtype == torch.float32


def test_sage_without_lse_says_the_ring_needs_it(fake_kernels, monkeypatch):
    def old_sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        return _sageattn(q, k, v, tensor_layout, is_causal, sm_scale)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=old_sageattn))
    q, k, v = _qkv(torch.bfloat16)
    attention(q, k, v, backend="sage")
    with pytest.raises(ValueError, match="does not return the log-sum-exp"):
        attention_lse(q, k, v, backend="sage")


def test_ring_merge_with_each_kernel(fake_kernels):
    """The ring's unit of work: K/V in blocks, each block's (out, lse) by the chosen kernel, merged in place."""
    from dit.parallel.attention import _merge_into

    q, k, v = _qkv(torch.bfloat16, length=24)
    ref, ref_lse = _reference(q, k, v)
    for name in ("flash", "flash3", "sage", "xformers", "sdpa", "math", "auto"):
        acc = torch.zeros(q.shape, dtype=torch.float32)
        lse = torch.full(q.shape[:3], float("-inf"))
        for kb, vb in zip(k.split([7, 9, 8], 2), v.split([7, 9, 8], 2)):
            _merge_into(acc, lse, q, kb, vb, D ** -0.5, 5, name)  # query blocks of 5
        torch.testing.assert_close(acc.double(), ref, atol=2e-2, rtol=0, msg=name)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=0, msg=name)


def test_model_backend_selection(fake_kernels):
    from dit.layers import Attention

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=4, text_embed_dim=8, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=5, max_text_seq_length=4)
    model = model.to(torch.bfloat16).eval()  # the flash kernels take half precision only
    x, text = torch.randn(1, 2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x, text, 10).sample.float()
        for name in ("_flash_3", "flash", "auto", "sage"):
            model.set_attention_backend(name)
            assert {m.attn_backend for m in model.modules() if isinstance(m, Attention)} == {A.canonical(name)}
            torch.testing.assert_close(model(x, text, 10).sample.float(), ref, atol=3e-2, rtol=0)
        model.set_attention_backend("flash")
        with pytest.raises(ValueError, match="'flash' cannot run this call: it takes float16 or bfloat16"):
            model.float()(x.float(), text.float(), 10)
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("flash9")


# ---------------------------------------------------------------------------------- context parallelism


def _cp_kernel_and_nccl_discipline(rank, world):
    """On 2 gloo ranks: the model's kernel runs inside the ring (a spy kernel sees the blocks), a backend set on a
    parallel model changes that kernel, a callable is refused; every p2p op goes through batch_isend_irecv, and
    each step's sends match the peer's receives in size (what NCCL's grouped p2p needs)."""
    import torch.distributed as dist

    from dit.parallel import ContextParallelConfig

    seen = []
    spy = dataclasses.replace(A.KERNELS["math"], name="spy",
                              forward_lse=lambda q, k, v, scale: (seen.append(k.shape[2]),
                                                                  A._math_lse(q, k, v, None, scale))[1])
    A.KERNELS["spy"] = spy
    A._INSTALLED["spy"] = None
    log = []
    real = {name: getattr(dist, name) for name in ("batch_isend_irecv", "isend", "irecv", "send", "recv", "P2POp")}

    def batch(ops):
        log.append([(op.op.__name__, op.peer, op.tensor.numel()) for op in ops])
        return real["batch_isend_irecv"](ops)

    def unbatched(name):
        def p2p(*args, **kwargs):
            raise AssertionError(f"dist.{name} outside batch_isend_irecv (NCCL needs p2p grouped)")
        return p2p

    guards = {name: unbatched(name) for name in ("isend", "irecv", "send", "recv")}

    def p2p_op(op, *args, **kwargs):  # a batched op names dist.isend / irecv: the real ones run in the batch
        return real["P2POp"]({guards["isend"]: real["isend"], guards["irecv"]: real["irecv"]}.get(op, op),
                             *args, **kwargs)

    dist.batch_isend_irecv, dist.P2POp = batch, p2p_op
    for name, guard in guards.items():
        setattr(dist, name, guard)
    try:
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            out_channels=4, time_embed_dim=4, text_embed_dim=8, num_layers=1,
                                            sample_width=8, sample_height=8, sample_frames=5,
                                            max_text_seq_length=4).eval()
        x, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 4, 8)
        with torch.no_grad():
            ref = model(x, text, 10).sample
            model.set_attention_backend("spy")
            model.enable_parallelism(ContextParallelConfig(ring_degree=2, ring_message_bytes=256))
            assert model._cp.attention.kernel == "spy"
            out = model(x, text, 10).sample
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            assert seen, "the ring did not use the model's kernel"
            model.set_attention_backend("math")  # the kernel inside the context-parallel attention
            assert model._cp.attention.kernel == "math" and model.is_parallel
            torch.testing.assert_close(model(x, text, 10).sample, ref, atol=1e-5, rtol=0)
            with pytest.raises(ValueError, match="runs context-parallel"):
                model.set_attention_backend(lambda q, k, v, *, mask, scale: q)
            model.disable_parallelism()
            assert model.attn_backend == "math"
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    assert log and all(len(ops) <= 2 for ops in log)
    everyone = [None] * world
    dist.all_gather_object(everyone, log)
    for r in range(world):  # step by step, rank r's send to its next rank is that rank's receive from r
        nxt = (r + 1) % world
        sends = [[n for op, peer, n in step if op == "isend" and peer == nxt] for step in everyone[r]]
        recvs = [[n for op, peer, n in step if op == "irecv" and peer == r] for step in everyone[nxt]]
        assert sends == recvs, (r, sends, recvs)


@pytest.mark.parallel
def test_context_parallel_kernel_and_batched_p2p():
    run_distributed(_cp_kernel_and_nccl_discipline, 2)


def _process_group_checks(rank, world):
    import torch.distributed as dist

    from dit.parallel.config import ParallelContext, check_process_group
    from dit.parallel import ContextParallelConfig
    from dit.parallel.sequence import gather_sizes

    check_process_group(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs init_process_group\\('nccl'\\)"):
        check_process_group(torch.device("cuda", 0))  # gloo serves CUDA tensors here: refused, not staged
    with pytest.raises(ValueError, match="process group runs CUDA tensors on 'gloo'"):
        ParallelContext(ContextParallelConfig(ring_degree=world), device="cuda:0")
    ctx = ParallelContext(ContextParallelConfig(ring_degree=world), device="cpu")
    ctx.connect(torch.device("cpu"))  # the NCCL warm-up: one collective per group, every rank, same order
    assert gather_sizes(rank + 3, ctx.world_group, torch.device("cpu")) == [3 + r for r in range(world)]
    assert dist.get_backend() == "gloo"


@pytest.mark.parallel
def test_process_group_matches_the_device():
    run_distributed(_process_group_checks, 2)
