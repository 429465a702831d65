"""Triton small-batch MoE (routing, experts) and the GDN gate kernel against their torch references
(pytest -m gpu on the device; also runs on CPU under TRITON_INTERPRET=1, calling the kernel modules directly)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nextserve.ops import gdn, moe

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or INTERPRET),
        reason="needs a CUDA GPU (or TRITON_INTERPRET=1); on a GPU a missing Triton module fails",
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


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 3e-2)])
@pytest.mark.parametrize("N", [1, 2, 5, 32])
def test_small_batch_moe_block_with_shared_expert(N, dtype, tol):
    """The four-launch block (router + shared gate GEMV, routing, experts with the shared one as a slot) against
    the torch block: routed experts plus sigmoid(gate) * shared MLP."""
    g = _gen(N)
    E, K, H, inter = 24, 4, 64, 32
    x = torch.randn(N, H, generator=g).to(dtype)
    router = (torch.randn(E, H, generator=g) / H**0.5).to(dtype)
    shared_gate = (torch.randn(1, H, generator=g) / H**0.5).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    sg, su = ((torch.randn(inter, H, generator=g) / H**0.5).to(dtype) for _ in range(2))
    sd = (torch.randn(H, inter, generator=g) / inter**0.5).to(dtype)

    f = lambda t: t.float()  # noqa: E731
    weights, ids = moe.route(f(x) @ f(router).T, K, True)
    shared = torch.sigmoid(f(x) @ f(shared_gate).T) * ((F.silu(f(x) @ f(sg).T) * (f(x) @ f(su).T)) @ f(sd).T)
    ref = moe.experts_reference(f(x), f(w13), f(w2), weights, ids) + shared

    dev = [t.to(DEVICE) for t in (x, torch.cat([router, shared_gate]), w13, w2, sg, su, sd)]
    out = moe.moe_block(dev[0], dev[1], dev[2], dev[3], tuple(dev[4:]), K, True).cpu().float()
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_silu_mul_and_combine_match_torch(dtype):
    g = _gen(11)
    N, K, H, inter = 37, 3, 96, 40
    h = torch.randn(N * K, 2 * inter, generator=g).to(dtype)
    ref = (F.silu(h[:, :inter]) * h[:, inter:]).float()
    out = moe.moe_triton.silu_mul(h.to(DEVICE)).cpu().float()
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == BF16 else 1e-6, atol=1e-2 if dtype == BF16 else 1e-6)
    y = torch.randn(N * K, H, generator=g).to(dtype)
    order = torch.randperm(N * K, generator=g)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K))
    w = torch.rand(N, K, generator=g)
    ref = (y.float()[inverse].view(N, K, H) * w[..., None]).sum(1)
    out = moe.moe_triton.combine(y.to(DEVICE), inverse.to(DEVICE), w.to(DEVICE)).cpu().float()
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == BF16 else 1e-6, atol=2e-2 if dtype == BF16 else 1e-5)


# ---- timing: `python tests/ops/test_gpu_moe_gates.py` (device only) ----


def _time_graph(fn, n: int = 50) -> float:
    """Microseconds per call of fn replayed from a CUDA graph (launch overhead excluded, as in a decode step)."""
    import time

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    """Routed experts at Qwen3-Next shapes (E=512, K=10, H=2048, I=512, bf16): Triton small-batch kernels against
    the grouped GEMM, by batch size; GB/s counts the weights of the distinct experts hit."""
    E, K, H, inter = 512, 10, 2048, 512
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=BF16) * 0.02
    w2 = torch.randn(E, H, inter, device="cuda", dtype=BF16) * 0.02
    print(f"{torch.cuda.get_device_name()}\n{'N':>4} {'experts':>8} {'triton us':>10} {'grouped us':>11} {'GB/s':>6}")
    for N in (1, 2, 4, 8, 16, 24, 32, 64):
        x = torch.randn(N, H, device="cuda", dtype=BF16)
        weights, ids = moe.route(torch.randn(N, E, device="cuda"), K, True)
        weights = weights.to(BF16)
        hit = ids.unique().numel()
        args = (x, w13, w2, weights, ids)
        t_triton = _time_graph(lambda a=args: moe.moe_triton.fused_experts(*a))
        t_grouped = _time_graph(lambda a=args: moe.grouped_experts(*a))
        print(f"{N:>4} {hit:>8} {t_triton:>10.1f} {t_grouped:>11.1f} {hit * 3 * H * inter * 2 / t_triton / 1e3:>6.0f}")


if __name__ == "__main__":
    main()
