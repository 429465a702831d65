"""Triton grouped experts for prefill-sized batches (ops/moe_grouped_triton.py) and the large-batch MoE block,
against the torch reference loop (pytest -m gpu on the device; also on CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nextserve.ops import moe

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or INTERPRET),
        reason="needs a CUDA GPU (or TRITON_INTERPRET=1); on a GPU a missing Triton module fails",
    ),
]
BF16, F16 = torch.bfloat16, torch.float16
SMALL_TILE = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(N: int, K: int, E: int, g: torch.Generator, only: int | None = None) -> torch.Tensor:
    """K distinct experts per token, drawn from the first `only` experts (the rest get no pairs)."""
    pool = only or E
    return torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(N)])


@pytest.mark.parametrize("N,K,E,block_m", [(1, 1, 4, 16), (37, 4, 8, 16), (50, 3, 16, 32), (300, 10, 64, 64)])
def test_block_layout(N, K, E, block_m):
    g = _gen(N * E)
    ids = _ids(N, K, E, g, only=max(K, E - 3))  # some experts empty
    rows, block_expert = moe.moe_grouped_triton.block_layout(ids.to(DEVICE), E, block_m)
    rows, block_expert, flat = rows.cpu(), block_expert.cpu(), ids.flatten()
    P = N * K
    assert block_expert.numel() == -(-P // block_m) + min(E, P)
    counts = torch.bincount(flat, minlength=E)
    used = sum(-(-c // block_m) for c in counts.tolist())
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    assert (block_expert[:used].diff() >= 0).all(), "blocks in expert order"
    r = rows[: used * block_m].view(used, block_m)
    taken = r[r >= 0]
    assert sorted(taken.tolist()) == list(range(P)), "every pair exactly once"
    assert (r[r < 0] == -1).all()
    for b in range(used):  # each block: its expert's pairs first, padding after
        blk = r[b]
        n = int((blk >= 0).sum())
        assert (blk[:n] >= 0).all() and (flat[blk[:n].long()] == block_expert[b]).all()


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize(
    "N,K,E,H,inter,block_m", [(33, 4, 16, 64, 32, 16), (100, 3, 24, 128, 64, 32), (7, 10, 64, 64, 32, 64)]
)
def test_grouped_experts_match_reference(N, K, E, H, inter, block_m, dtype):
    g = _gen(N + H)
    x = torch.randn(N, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    weights, ids = moe.route(torch.randn(N, E, generator=g), K, True)
    ref = moe.experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    args = [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]
    tiles = dict(gate_up_tile=SMALL_TILE, down_tile=SMALL_TILE, block_m=block_m)
    out = moe.moe_grouped_triton.grouped_experts(*args, **tiles)
    assert torch.isfinite(out.float()).all()
    assert (out.cpu().float() - ref).abs().max() <= 2e-2 * max(1.0, ref.abs().max().item())
    # The rows' order inside an expert's blocks comes from atomics; each row's result must not depend on it.
    assert torch.equal(out, moe.moe_grouped_triton.grouped_experts(*args, **tiles))


@pytest.mark.parametrize(
    "N,E,K,H,inter,s_inter", [(33, 24, 4, 64, 32, 48), (120, 24, 4, 64, 32, 48), (370, 8, 2, 32, 16, 24)]
)
def test_large_batch_moe_block_with_shared_expert(N, E, K, H, inter, s_inter):
    """The large-batch block (router + shared gate GEMM, routing, shared MLP, grouped experts, combine with the
    gated shared output) against the torch block, with the default tiles clamped to small sizes (the last case is
    the engine tests' tiny model)."""
    g = _gen(N)
    x = torch.randn(N, H, generator=g).to(BF16)
    router = (torch.randn(E, H, generator=g) / H**0.5).to(BF16)
    shared_gate = (torch.randn(1, H, generator=g) / H**0.5).to(BF16)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(BF16)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(BF16)
    sg, su = ((torch.randn(s_inter, H, generator=g) / H**0.5).to(BF16) for _ in range(2))
    sd = (torch.randn(H, s_inter, generator=g) / s_inter**0.5).to(BF16)

    dev = [t.to(DEVICE) for t in (x, torch.cat([router, shared_gate]), w13, w2, sg, su, sd)]
    # The routing as the block makes it (bf16 logits: near-ties may pick other experts than fp32 logits would;
    # the routing kernel has its own test), then everything else in fp32 torch.
    weights, ids, gate = moe.moe_triton.route(F.linear(dev[0], dev[1]), K, True, num_experts=E)
    weights, ids, gate = weights.cpu(), ids.cpu(), gate.cpu()
    f = lambda t: t.float()  # noqa: E731
    shared = gate[:, None] * ((F.silu(f(x) @ f(sg).T) * (f(x) @ f(su).T)) @ f(sd).T)
    ref = moe.experts_reference(f(x), f(w13), f(w2), weights, ids) + shared
    if DEVICE == "cuda":
        assert moe.fused_block(dev[0], dev[3], dev[6])
    out = moe.moe_block(dev[0], dev[1], dev[2], dev[3], tuple(dev[4:]), K, True).cpu().float()
    assert (out - ref).abs().max() <= 3e-2 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_silu_mul_apart_and_combine_with_shared(dtype):
    g = _gen(5)
    N, K, H, inter = 29, 3, 80, 40
    gate, up = (torch.randn(N, inter, generator=g).to(dtype) for _ in range(2))
    ref = (F.silu(gate) * up).float()
    out = moe.moe_triton.silu_mul(gate.to(DEVICE), up.to(DEVICE)).cpu().float()
    tol = 2e-2 if dtype == BF16 else 1e-6  # bf16: two roundings (SiLU, product), each may land an ulp apart
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    y = torch.randn(N * K, H, generator=g).to(dtype)
    w = torch.rand(N, K, generator=g)
    s = torch.randn(N, H, generator=g).to(dtype)
    sgate = torch.rand(N, generator=g)
    ref = (y.float().view(N, K, H) * w[..., None]).sum(1) + sgate[:, None] * s.float()
    out = moe.moe_triton.combine(y.to(DEVICE), None, w.to(DEVICE), (s.to(DEVICE), sgate.to(DEVICE))).cpu().float()
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == BF16 else 1e-6, atol=2e-2 if dtype == BF16 else 1e-5)
