"""Block-FP8 Triton kernels (ops/fp8_triton.py, the FP8 branches of ops/moe_triton.py and ops/moe_grouped_triton.py)
against the torch references of ops/fp8.py (pytest -m gpu on the device; also on CPU under TRITON_INTERPRET=1,
where the larger shapes are left to the GPU).

Tolerances: the kernels and the references quantise identically (bit-equal activations, same fp8 weights) and both
accumulate in fp32; they differ in summation order only (per-128 partial sums scaled per tile against one fp32
dot of dequantised operands), i.e. ~1e-6 relative before the single rounding to bf16/fp16, so the linear is held to
one output ulp (rtol 1e-2 covers bf16's 2^-8). The experts round their intermediate to the model dtype and quantise
it again: an intermediate one ulp apart (the fp32 sums, or the GPU's exp in SiLU) can move the row's scale or land
an e4m3 value one step (1/16) away, so those get 3e-2 of the output's largest magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nextserve.loader.fp8 import quantize_block_fp8
from nextserve.ops import fp8, moe

try:
    from nextserve.ops import fp8_triton as ft
except ImportError:  # a CUDA machine without Triton fails in _kernels() below, it does not skip
    ft = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)"),
]
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
B = (128, 128)
gpu_only = pytest.mark.skipif(not CUDA, reason="too slow for Triton's interpreter")


def _kernels():
    if ft is None or moe.moe_triton is None or moe.moe_grouped_triton is None:
        pytest.fail("Triton is not importable: the FP8 kernels cannot run")
    return ft


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_block_fp8(torch.randn(N, K, generator=g) / K**0.5, B)


def _experts(E: int, H: int, inter: int, g: torch.Generator):
    """Packed FP8 experts: w13 [E, 2I, H] (gate and up blocked apart), w2 [E, H, I], with their scales."""
    w13, s13, w2, s2 = [], [], [], []
    for _ in range(E):
        (qg, sg), (qu, su) = _weight(inter, H, g), _weight(inter, H, g)
        w13.append(torch.cat([qg, qu]))
        s13.append(torch.cat([sg, su]))
        q, s = _weight(H, inter, g)
        w2.append(q)
        s2.append(s)
    return torch.stack(w13), torch.stack(s13), torch.stack(w2), torch.stack(s2)


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    out, ref = out.cpu().float(), ref.cpu().float()
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), err


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


# ---- activation quantisation ----


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("M,K", [(1, 128), (3, 300), (33, 1000), pytest.param(300, 2048, marks=gpu_only)])
def test_quantize_act_bit_equal(M, K, dtype):
    k = _kernels()
    x = (torch.randn(M, K, generator=_gen(M + K)) * 3).to(dtype)
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 5.0, -448.0])  # zeros, underflow, a group's max
    if M > 2:
        x[1] = 0  # an all-zero row: scale EPS / 448, zeros out
        x[2, :7] *= 1e4  # far beyond 448 before scaling
    q, s = k.quantize_act(x.to(DEVICE), 128)
    q0, s0 = fp8.quantize_act(x, 128)
    # Same formula, IEEE division, saturating round-to-nearest-even cast: bit for bit, -0 included.
    assert torch.equal(q.cpu().view(torch.uint8), q0.view(torch.uint8))
    assert torch.equal(s.cpu(), s0)


# ---- dense linear ----

LINEAR_SHAPES = [(200, 300), (64, 128), (130, 384), pytest.param(512, 2048, marks=gpu_only)]


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("N,K", LINEAR_SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 16, 33, pytest.param(300, marks=gpu_only), pytest.param(4096, marks=gpu_only)])
def test_linear_matches_reference(M, N, K, dtype):
    k = _kernels()
    g = _gen(M * 7 + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w, ws = _weight(N, K, g)
    ref = fp8.linear_reference(x, w, ws, B)
    xd, wd, wsd = _dev(x, w, ws)
    out = k.linear(xd, wd, wsd, B)
    assert out.dtype == dtype and out.shape == (M, N)
    ref, got = ref.float(), out.cpu().float()
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item())
    assert torch.equal(out, k.linear(xd, wd, wsd, B)), "not deterministic"
    # every tile (the dot GEMM's table, the GEMV for small M) computes the same thing (one shape: compile time)
    if (N, K, dtype) == (130, 384, BF16):
        tiles = [t for _, t in k.LINEAR_TILES] + ([k.GEMV_TILE, dict(BR=8, BC=128, num_warps=2)] if M <= 16 else [])
        for t in tiles:
            got = k.linear(xd, wd, wsd, B, tile=t).cpu().float()
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item())
    # the public entry point (ops/fp8.linear) takes the same path on CUDA, with leading dimensions
    if CUDA:
        torch.testing.assert_close(fp8.linear(xd.view(1, M, K), wd, wsd, B).view(M, N), out)


@pytest.mark.skipif(not CUDA, reason="cuBLAS")
def test_scaled_mm_path_when_available():
    k = _kernels()
    g = _gen(9)
    M, N, K = 1024, 512, 2048
    x = torch.randn(M, K, generator=g).to(BF16)
    w, ws = _weight(N, K, g)
    ref = fp8.linear_reference(x, w, ws, B).float()
    if not k.scaled_mm_works(DEVICE):
        pytest.skip("torch's block-scaled scaled_mm does not run here (Triton serves every M)")
    xq, xs = k.quantize_act(x.cuda(), 128, m_major=True)
    out = k._scaled_mm(xq, xs, w.cuda(), ws.cuda(), BF16).cpu().float()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item())


def test_unsupported_block_falls_back():
    k = _kernels()
    assert k.supports(B) and not k.supports((64, 64)) and not k.supports((128, 64))
    g = _gen(4)
    x = torch.randn(5, 192, generator=g).to(BF16)
    w, ws = quantize_block_fp8(torch.randn(96, 192, generator=g), (64, 64))
    with pytest.raises(ValueError):
        k.linear(x.to(DEVICE), w.to(DEVICE), ws.to(DEVICE), (64, 64))
    args = _dev(x, w, ws)
    out = fp8.linear(*args, (64, 64))  # the torch reference serves it
    torch.testing.assert_close(out, fp8.linear_reference(*args, (64, 64)))


# ---- routed experts ----

EXPERT_SHAPES = [  # N, E, K, H, I: the engine tests' tiny model; I not a multiple of 128; H not one either
    (1, 8, 2, 128, 64),
    (3, 16, 4, 256, 192),
    (5, 8, 2, 200, 130),
    pytest.param(16, 64, 10, 512, 256, marks=gpu_only),
    pytest.param(32, 512, 10, 2048, 512, marks=gpu_only),
]


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("N,E,K,H,inter", EXPERT_SHAPES)
def test_small_batch_experts_fp8(N, E, K, H, inter, dtype):
    _kernels()
    g = _gen(N * 11 + H + inter)
    x = torch.randn(N, H, generator=g).to(dtype)
    w13, s13, w2, s2 = _experts(E, H, inter, g)
    weights, ids = moe.route(torch.randn(N, E, generator=g), K, True)
    ref = fp8.experts_reference(x, w13, s13, w2, s2, weights, ids, B)
    args = _dev(x, w13, w2, weights, ids)
    sc = dict(w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE), block=B)
    out = moe.moe_triton.fused_experts(*args, **sc)
    _close(out, ref, 3e-2)
    assert torch.equal(out, moe.moe_triton.fused_experts(*args, **sc)), "not deterministic"


def _shared_reference(x, shared, scales, gate):
    """gate[n] * down(SiLU(gate_proj x) * up_proj x), each projection the FP8 reference linear."""
    (sg, su, sd), (ssg, ssu, ssd) = shared, scales
    h = F.silu(fp8.linear_reference(x, sg, ssg, B)) * fp8.linear_reference(x, su, ssu, B)
    return gate[:, None] * fp8.linear_reference(h, sd, ssd, B).float()


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("N,E,K,H,inter", [(2, 8, 2, 128, 64), pytest.param(9, 64, 10, 512, 256, marks=gpu_only)])
def test_small_batch_experts_fp8_with_shared_slot(N, E, K, H, inter, dtype):
    _kernels()
    g = _gen(N + E)
    x = torch.randn(N, H, generator=g).to(dtype)
    w13, s13, w2, s2 = _experts(E, H, inter, g)
    (sg, ssg), (su, ssu), (sd, ssd) = _weight(inter, H, g), _weight(inter, H, g), _weight(H, inter, g)
    gate = torch.rand(N, generator=g)
    weights, ids = moe.route(torch.randn(N, E, generator=g), K, True)
    ref = fp8.experts_reference(x, w13, s13, w2, s2, weights, ids, B).float()
    ref = ref + _shared_reference(x, (sg, su, sd), (ssg, ssu, ssd), gate)
    out = moe.moe_triton.fused_experts(
        *_dev(x, w13, w2, weights, ids),
        shared=tuple(_dev(sg, su, sd, gate)),
        w13_scale=s13.to(DEVICE),
        w2_scale=s2.to(DEVICE),
        shared_scales=tuple(_dev(ssg, ssu, ssd)),
        block=B,
    )
    _close(out, ref, 3e-2)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize(
    "N,E,K,H,inter,block_m",
    [(7, 8, 2, 128, 64, 16), (20, 4, 2, 256, 128, 32), pytest.param(300, 64, 10, 512, 256, 64, marks=gpu_only)],
)
def test_grouped_experts_fp8(N, E, K, H, inter, block_m, dtype):
    _kernels()
    g = _gen(N + H)
    x = torch.randn(N, H, generator=g).to(dtype)
    w13, s13, w2, s2 = _experts(E, H, inter, g)
    weights, ids = moe.route(torch.randn(N, E, generator=g), K, True)
    ref = fp8.experts_reference(x, w13, s13, w2, s2, weights, ids, B)
    assert moe.moe_grouped_triton.supports(H, inter, B)
    args = _dev(x, w13, w2, weights, ids)
    sc = dict(w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE), block=B, block_m=block_m)
    out = moe.moe_grouped_triton.grouped_experts(*args, **sc)
    _close(out, ref, 3e-2)
    # rows reach their expert's blocks in atomics' order; each row's result must not depend on it
    assert torch.equal(out, moe.moe_grouped_triton.grouped_experts(*args, **sc)), "not deterministic"


def test_grouped_fp8_supports():
    _kernels()
    grouped = moe.moe_grouped_triton
    assert grouped.supports(2048, 512, B) and grouped.supports(128, 64, B)
    assert not grouped.supports(2048, 192, B)  # the gate_up tile would straddle quantisation groups
    assert not grouped.supports(2048, 512, (64, 64))


@pytest.mark.skipif(not CUDA, reason="dispatch is on CUDA tensors")
def test_dispatch_fp8_small_then_grouped():
    g = _gen(3)
    E, K, H, inter = 32, 4, 256, 128
    w13, s13, w2, s2 = _dev(*_experts(E, H, inter, g))
    for N in (1, moe.SMALL_BATCH_MAX, moe.SMALL_BATCH_MAX + 1, 300):
        x = torch.randn(N, H, generator=g).to(BF16).cuda()
        weights, ids = moe.route(torch.randn(N, E, generator=g).cuda(), K, True)
        ref = fp8.experts_reference(x, w13, s13, w2, s2, weights, ids, B)
        out = moe.fused_experts(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, block=B)
        _close(out, ref, 3e-2)


@pytest.mark.parametrize("N", [2, pytest.param(40, marks=gpu_only), pytest.param(370, marks=gpu_only)])
def test_moe_block_fp8_with_shared_expert(N):
    """The FP8 MoE block (bf16 router + shared gate, routing, FP8 experts with the shared expert as a slot for small
    batches or as an FP8 MLP for large ones) against the references with the block's own routing."""
    _kernels()
    g = _gen(N)
    E, K, H, inter = (8, 2, 128, 64) if N < 40 else (24, 4, 256, 128)
    x = torch.randn(N, H, generator=g).to(BF16)
    router = (torch.randn(E + 1, H, generator=g) / H**0.5).to(BF16)
    w13, s13, w2, s2 = _experts(E, H, inter, g)
    (sg, ssg), (su, ssu), (sd, ssd) = _weight(inter, H, g), _weight(inter, H, g), _weight(H, inter, g)
    dev = _dev(x, router, w13, w2, sg, su, sd)
    weights, ids, gate = moe.moe_triton.route(F.linear(dev[0], dev[1]), K, True, num_experts=E)
    weights, ids, gate = weights.cpu(), ids.cpu(), gate.cpu()
    ref = fp8.experts_reference(x, w13, s13, w2, s2, weights, ids, B).float()
    ref = ref + _shared_reference(x, (sg, su, sd), (ssg, ssu, ssd), gate)
    if CUDA:
        assert moe.fused_block(dev[0], dev[3], dev[6], B)
    out = moe.moe_block(
        dev[0], dev[1], dev[2], dev[3], tuple(dev[4:]), K, True,
        w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE), shared_scales=tuple(_dev(ssg, ssu, ssd)), block=B,
    )  # fmt: skip
    _close(out, ref, 3e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_cuda_graph_capture_decode_moe_and_linear():
    """A decode step's FP8 pieces (the small-batch experts with the shared slot, a linear with the quantisation in
    its prologue) captured in a CUDA graph and replayed on new inputs: no host sync, same results as eager."""
    k = _kernels()
    g = _gen(1)
    N, E, K, H, inter = 4, 64, 10, 512, 256
    w13, s13, w2, s2 = _dev(*_experts(E, H, inter, g))
    shared_w = [_weight(inter, H, g), _weight(inter, H, g), _weight(H, inter, g)]
    shared = [w.cuda() for w, _ in shared_w]
    shared_s = tuple(s.cuda() for _, s in shared_w)
    lw, lws = _dev(*_weight(1024, H, g))
    x = torch.randn(N, H, generator=g).to(BF16).cuda()
    weights, ids = moe.route(torch.randn(N, E, generator=g).cuda(), K, True)
    gate = torch.rand(N, generator=g).cuda()

    def step():
        y = moe.moe_triton.fused_experts(
            x, w13, w2, weights, ids, shared=(*shared, gate), w13_scale=s13, w2_scale=s2, shared_scales=shared_s,
            block=B,
        )  # fmt: skip
        return y, k.linear(y, lw, lws, B)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (2, 3):
        gg = _gen(seed)
        x.copy_(torch.randn(N, H, generator=gg).to(BF16))
        w_new, i_new = moe.route(torch.randn(N, E, generator=gg).cuda(), K, True)
        weights.copy_(w_new)
        ids.copy_(i_new)
        graph.replay()
        eager = step()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
