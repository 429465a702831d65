"""Triton small-batch MoE (routing, experts) and the GDN gate kernel against their torch references
(pytest -m gpu on the device; also runs on CPU under TRITON_INTERPRET=1, calling the kernel modules directly)."""

from __future__ import annotations

import os

import pytest
import torch

from nextserve.ops import gdn, moe

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        moe.moe_triton is None or not (torch.cuda.is_available() or INTERPRET),
        reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)",
    ),
]
F32, BF16 = torch.float32, torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N,E,K,renorm", [(1, 16, 4, True), (7, 24, 3, False), (3, 512, 10, True)])
def test_route_matches_reference(N, E, K, renorm, dtype):
    logits = torch.randn(N, E, generator=_gen(N + E)).to(dtype)
    w, ids = moe.moe_triton.route(logits.to(DEVICE), K, renorm)
    w0, ids0 = moe.route(logits, K, renorm)  # CPU: the torch reference
    probs = torch.softmax(logits.float(), -1)
    # Equal probabilities (bf16 logits repeat) may be picked in another order: compare what was picked.
    torch.testing.assert_close(probs.gather(1, ids.cpu()), probs.gather(1, ids0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.cpu(), w0, rtol=1e-5, atol=1e-6)
    assert ids.dtype == torch.int64 and (ids.cpu().sort(1).values.diff(dim=1) != 0).all(), "an expert picked twice"


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 2e-2)])
@pytest.mark.parametrize("N,E,K,H,inter", [(1, 16, 4, 64, 32), (5, 24, 3, 48, 40), (16, 64, 10, 256, 64)])
def test_small_batch_experts_match_reference(N, E, K, H, inter, dtype, tol):
    g = _gen(N * 7 + H)
    x = torch.randn(N, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    weights, ids = moe.route(torch.randn(N, E, generator=g), K, True)
    ref = moe.experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    out = moe.moe_triton.fused_experts(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids))).cpu().float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dispatch is on CUDA tensors")
def test_dispatch_uses_small_batch_path_then_grouped():
    g = _gen(3)
    E, K, H, inter = 32, 4, 128, 64
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(BF16).cuda()
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(BF16).cuda()
    for N in (1, moe.SMALL_BATCH_MAX, moe.SMALL_BATCH_MAX + 1, 300):
        x = torch.randn(N, H, generator=g).to(BF16).cuda()
        weights, ids = moe.route(torch.randn(N, E, generator=g).cuda(), K, True)
        ref = moe.experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
        out = moe.fused_experts(x, w13, w2, weights.to(BF16), ids).float()
        assert (out - ref).abs().max() <= 3e-2 * max(1.0, ref.abs().max().item()), N


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("T,hk,r", [(1, 2, 2), (37, 4, 1), (300, 16, 2)])
def test_gdn_gates_match_reference(T, hk, r, dtype):
    g = _gen(T + hk)
    # Wide range: softplus' linear branch (a + dt > 20) and its tiny-value end both show up.
    ba = (torch.randn(T, hk * 2 * r, generator=g) * 10).to(dtype).view(T, hk, 2 * r)
    A_log = torch.randn(hk * r, generator=g).to(dtype)
    dt_bias = torch.randn(hk * r, generator=g).to(dtype)
    gk, beta = gdn.gdn_cuda.gdn_gates(ba.to(DEVICE), A_log.to(DEVICE), dt_bias.to(DEVICE))
    g0, beta0 = gdn.gdn_gates(ba, A_log, dt_bias)
    assert gk.dtype == torch.float32 and beta.dtype == dtype
    torch.testing.assert_close(gk.cpu(), g0, rtol=1e-5, atol=1e-6)
    # bf16: one rounding step apart at most (the interpreter truncates where the GPU rounds).
    torch.testing.assert_close(beta.cpu().float(), beta0.float(), rtol=0, atol=4e-3 if dtype == BF16 else 1e-6)
