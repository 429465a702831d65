"""Block-FP8 compute references (ops/fp8.py) against independent, loop-by-block formulas (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from nextserve.loader.fp8 import FP8_MAX, dequantize_block_fp8, quantize_block_fp8
from nextserve.ops import fp8, moe

BLOCK = (128, 128)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("M,K", [(1, 128), (5, 300), (3, 64), (2, 256)])
def test_quantize_act_scales_and_rounding(M, K):
    x = torch.randn(M, K, generator=_gen(K)) * torch.logspace(-3, 2, M)[:, None]
    x[0, :7] = 0.0
    xq, xs = fp8.quantize_act(x, 128)
    G = -(-K // 128)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == (M, K) and xs.shape == (M, G)
    for m in range(M):
        for g in range(G):
            part = x[m, g * 128 : (g + 1) * 128]
            # The scale puts each group's largest magnitude on e4m3's largest finite value.
            assert xs[m, g].item() == pytest.approx(part.abs().max().item() / FP8_MAX, rel=1e-6)
            q = xq[m, g * 128 : (g + 1) * 128].float()
            assert q.abs().max().item() == pytest.approx(FP8_MAX)
            # e4m3 round to nearest: half an ulp (2^-4 relative) for normals, 2^-10 absolute below them.
            err = (q * xs[m, g] - part).abs()
            assert (err <= 2.0**-4 * part.abs() + 2.0**-10 * xs[m, g]).all()
    back = fp8.dequantize_act(xq, xs, 128)
    assert back.shape == x.shape


def test_quantize_act_all_zero_row():
    xq, xs = fp8.quantize_act(torch.zeros(2, 130), 128)
    assert torch.isfinite(xs).all() and (xs > 0).all()
    assert (xq.float() == 0).all()


def _block_loop_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y[m, n] = sum over K blocks of (xq . wq)_block * xs[m, kb] * ws[n // 128, kb], block by block (the way the
    kernels accumulate), independent of the reference's dequantise-then-matmul."""
    xq, xs = fp8.quantize_act(x, 128)
    M, K = x.shape
    N = wq.shape[0]
    y = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(-(-K // 128)):
        cols = slice(kb * 128, (kb + 1) * 128)
        part = xq[:, cols].double() @ wq[:, cols].double().T  # [M, N]
        wscale = ws[torch.arange(N) // 128, kb].double()  # [N]
        y += part * xs[:, kb, None].double() * wscale[None, :]
    return y


@pytest.mark.parametrize("M,N,K", [(1, 256, 128), (7, 300, 260), (16, 64, 96), (3, 129, 512)])
def test_linear_reference_equals_the_block_loop(M, N, K):
    g = _gen(M * N + K)
    x = torch.randn(M, K, generator=g)
    wq, ws = quantize_block_fp8(torch.randn(N, K, generator=g) / K**0.5, BLOCK)
    got = fp8.linear(x, wq, ws, BLOCK)  # CPU: the reference
    assert got.dtype == x.dtype and got.shape == (M, N)
    torch.testing.assert_close(got.double(), _block_loop_linear(x, wq, ws), rtol=1e-5, atol=1e-5)
    # bf16 activations: the fp32 sum rounded once to bf16.
    got16 = fp8.linear(x.bfloat16(), wq, ws, BLOCK)
    ref16 = _block_loop_linear(x.bfloat16(), wq, ws).to(torch.bfloat16)
    torch.testing.assert_close(got16, ref16, rtol=1e-2, atol=1e-2)
    # Leading dims pass through.
    assert fp8.linear(x.view(1, M, K), wq, ws, BLOCK).shape == (1, M, N)


def test_linear_close_to_the_unquantised_product():
    g = _gen(5)
    x, w = torch.randn(8, 512, generator=g), torch.randn(384, 512, generator=g) / 512**0.5
    wq, ws = quantize_block_fp8(w, BLOCK)
    y = fp8.linear(x, wq, ws, BLOCK)
    exact = x @ w.T
    rel = (y - exact).norm() / exact.norm()
    assert 0 < rel < 0.05  # two e4m3 roundings (~2^-5 each, averaging down over the sum)


def _fp8_experts(E: int, H: int, I: int, g: torch.Generator):
    """Packed FP8 experts quantised per projection (gate and up blocked apart), and their fp32 originals."""
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    q13, s13, q2, s2 = [], [], [], []
    for e in range(E):
        (qg, sg), (qu, su) = quantize_block_fp8(w13[e, :I], BLOCK), quantize_block_fp8(w13[e, I:], BLOCK)
        q13.append(torch.cat([qg, qu]))
        s13.append(torch.cat([sg, su]))
        q, s = quantize_block_fp8(w2[e], BLOCK)
        q2.append(q)
        s2.append(s)
    return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)


@pytest.mark.parametrize("E,H,I,N,K", [(8, 128, 64, 5, 2), (4, 160, 200, 9, 3)])
def test_experts_reference_is_the_bf16_reference_on_dequantised_operands(E, H, I, N, K):
    """The FP8 experts equal the plain expert loop run on dequantised weights with every GEMM input replaced by
    its quantise-dequantise image (hooked into F.linear), i.e. FP8 changes operands, not the algorithm."""
    g = _gen(E * H)
    q13, s13, q2, s2 = _fp8_experts(E, H, I, g)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    got = fp8.experts_reference(x, q13, s13, q2, s2, weights, ids, BLOCK)

    w13 = torch.stack([fp8.dequantize_w13(q13[e], s13[e], BLOCK) for e in range(E)])
    w2 = torch.stack([dequantize_block_fp8(q2[e], s2[e], BLOCK, torch.float32) for e in range(E)])
    real_linear = F.linear

    def quantised_linear(a, w):
        return real_linear(fp8.dequantize_act(*fp8.quantize_act(a, 128), 128), w)

    F.linear = quantised_linear
    try:
        want = moe.experts_reference(x, w13, w2, weights, ids)
    finally:
        F.linear = real_linear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # And FP8 really changed something against the unquantised experts.
    assert not torch.allclose(got, moe.experts_reference(x, w13, w2, weights, ids), atol=1e-6)


def test_fused_experts_dispatch_takes_fp8_scales_on_cpu():
    g = _gen(11)
    q13, s13, q2, s2 = _fp8_experts(4, 128, 64, g)
    x = torch.randn(3, 128, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    weights = torch.full((3, 2), 0.5)
    got = moe.fused_experts(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, block=BLOCK)
    torch.testing.assert_close(got, fp8.experts_reference(x, q13, s13, q2, s2, weights, ids, BLOCK))
