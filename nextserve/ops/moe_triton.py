"""Small-batch MoE on CUDA (decode): routing and the routed experts in three Triton kernels, no sorting.

At a handful of tokens the grouped GEMM's sort, offsets, gathers and scatter cost more launches than its two GEMMs
take time, and every (token, expert) pair reads its own expert's weights anyway. Here:
  route:    one program per token: softmax over E logits (fp32), top-k by repeated argmax, optional renormalise.
  gate_up:  one program per (pair, block of I rows): h = SiLU(x W_gate^T) * (x W_up^T) as a GEMV over H.
  down:     one program per (token, block of H outputs): out = sum_k w_k * (h_k W_down^T), the K pairs summed
            in fp32 in the program, so no atomics and no second pass.
Same contracts as `moe.route` and `moe.fused_experts`; numerics as the grouped path (fp32 accumulation, bf16
intermediates rounded where torch rounds them). Everything reads ids from the device: capturable in CUDA graphs.
Legend: N tokens, H hidden, E experts, I expert intermediate size (per TP rank), K experts per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes: a GEMV streams weight rows; 16 rows x 256 columns of bf16 per load keeps each warp's loads coalesced
# and gives ~128-160 KB of weights per program at Qwen3-Next shapes (I=512, H=2048).
_BLOCK_ROWS, _BLOCK_COLS, _WARPS = 16, 256, 4


@triton.jit
def _route_kernel(
    logits_ptr, w_ptr, ids_ptr, stride_l, E, K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr, BE: tl.constexpr
):
    n = tl.program_id(0)
    oe = tl.arange(0, BE)
    x = tl.load(logits_ptr + n * stride_l + oe, mask=oe < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    left = tl.where(oe < E, p, -1.0)
    ok = tl.arange(0, KP)
    wv = tl.zeros([KP], dtype=tl.float32)
    iv = tl.zeros([KP], dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.argmax(left, 0)  # the lowest index among equal maxima
        wv = tl.where(ok == k, tl.max(left, 0), wv)
        iv = tl.where(ok == k, best.to(tl.int64), iv)
        left = tl.where(oe == best, -1.0, left)
    if RENORM:
        wv = wv / tl.sum(wv, 0)
    tl.store(w_ptr + n * K + ok, wv, mask=ok < K)
    tl.store(ids_ptr + n * K + ok, iv, mask=ok < K)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, K] fp32, expert ids [N, K] int64), best first."""
    N, E = router_logits.shape
    weights = torch.empty(N, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=router_logits.device)
    if N:
        _route_kernel[(N,)](
            router_logits,
            weights,
            ids,
            router_logits.stride(0),
            E,
            K=top_k,
            KP=triton.next_power_of_2(top_k),
            RENORM=renormalize,
            BE=triton.next_power_of_2(E),
        )
    return weights, ids


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, ids_ptr, h_ptr, H, I, K: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, FP32: tl.constexpr
):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    token = pair // K
    e = tl.load(ids_ptr + pair).to(tl.int64)
    base = w13_ptr + e * (2 * I * H)
    mr = rows < I
    acc_g = tl.zeros([BR], dtype=tl.float32)
    acc_u = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, H, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < H
        xv = tl.load(x_ptr + token * H + cols, mask=mc, other=0.0).to(tl.float32)
        m = mr[:, None] & mc[None, :]
        wg = tl.load(base + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(base + (I + rows[:, None]) * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], 1)
        acc_u += tl.sum(wu * xv[None, :], 1)
    if not FP32:  # the grouped GEMM's outputs are in the model dtype before the activation
        acc_g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
        acc_u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + pair * I + rows, h.to(h_ptr.dtype.element_ty), mask=mr)


@triton.jit
def _down_kernel(h_ptr, w2_ptr, ids_ptr, wts_ptr, out_ptr, H, I, K: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)  # output features
    mr = rows < H
    acc = tl.zeros([BR], dtype=tl.float32)
    for k in range(K):
        pair = token * K + k
        e = tl.load(ids_ptr + pair).to(tl.int64)
        wt = tl.load(wts_ptr + pair).to(tl.float32)
        base = w2_ptr + e * (H * I)
        y = tl.zeros([BR], dtype=tl.float32)
        for c0 in range(0, I, BC):
            cols = c0 + tl.arange(0, BC)
            mc = cols < I
            hv = tl.load(h_ptr + pair * I + cols, mask=mc, other=0.0).to(tl.float32)
            w = tl.load(base + rows[:, None] * I + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
            y += tl.sum(w.to(tl.float32) * hv[None, :], 1)
        acc += wt * y.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token * H + rows, acc.to(out_ptr.dtype.element_ty), mask=mr)


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[n,k] * expert_{ids[n,k]}(x[n]); x [N, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous)."""
    assert w13.is_contiguous() and w2.is_contiguous(), "expert weights are indexed by raw offsets"
    x = x.contiguous()
    N, H = x.shape
    K, inter = ids.shape[1], w2.shape[-1]
    out = torch.empty_like(x)
    if N == 0:
        return out
    ids, weights = ids.contiguous(), weights.contiguous()
    h = torch.empty(N * K, inter, dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    bc_h, bc_i = min(_BLOCK_COLS, triton.next_power_of_2(H)), min(_BLOCK_COLS, triton.next_power_of_2(inter))
    _gate_up_kernel[(N * K, triton.cdiv(inter, _BLOCK_ROWS))](
        x, w13, ids, h, H, inter, K=K, BR=_BLOCK_ROWS, BC=bc_h, FP32=fp32, num_warps=_WARPS
    )
    _down_kernel[(N, triton.cdiv(H, _BLOCK_ROWS))](
        h, w2, ids, weights, out, H, inter, K=K, BR=_BLOCK_ROWS, BC=bc_i, num_warps=_WARPS
    )
    return out
