"""Small-batch MoE on CUDA (decode): routing and the routed experts in three Triton kernels, no sorting.

At a handful of tokens the grouped GEMM's sort, offsets, gathers and scatter cost more launches than its two GEMMs
take time, and every (token, expert) pair reads its own expert's weights anyway. Here:
  route:    one program per token: softmax over E logits (fp32), top-k by repeated argmax, optional renormalise,
            and the shared expert's sigmoid gate when its logit rides along as column E.
  gate_up:  one program per (pair, block of I rows): h = SiLU(x W_gate^T) * (x W_up^T) as a GEMV over H.
  down:     one program per (token, block of H outputs): out = sum_k w_k * (h_k W_down^T), the K pairs summed
            in fp32 in the program, so no atomics and no second pass.
The shared expert can ride along as one more slot per token (`shared=`), which saves its five launches.
Same contracts as `moe.route` and `moe.fused_experts`; numerics as the grouped path (fp32 accumulation, bf16
intermediates rounded where torch rounds them). Everything reads ids from the device: capturable in CUDA graphs.
Legend: N tokens, H hidden, E experts, I expert intermediate size (per TP rank), K experts per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nextserve.ops import fp8_triton
from nextserve.ops.fp8_triton import quantize_tile, round_to

# Tile sizes, swept on an H100 at Qwen3-Next shapes (H=2048, I=512, K=10, bf16) under CUDA graphs: wide rows keep
# each warp's loads coalesced; at one or two tokens the down kernel unrolls its K experts so that all their loads
# are in flight at once (latency-bound), from four tokens on the plain loop wins.
TILES = dict(gu_rows=4, gu_cols=1024, gu_warps=4, down_rows=8, down_cols=512, down_warps=4, down_unroll=False)
TILES_TINY_BATCH = TILES | dict(down_rows=4, down_unroll=True)
# Block FP8 (one byte per weight): changes to the tiles above, measured on an H100 (nextserve/bench/fp8_kernels.py).
TILES_FP8: dict = {}


@triton.jit
def _route_kernel(
    logits_ptr,
    w_ptr,
    ids_ptr,
    s_ptr,
    stride_l,
    E,
    K: tl.constexpr,
    KP: tl.constexpr,
    RENORM: tl.constexpr,
    SHARED: tl.constexpr,
    BE: tl.constexpr,
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
    if SHARED:  # column E is the shared expert's gate logit
        g = tl.load(logits_ptr + n * stride_l + E).to(tl.float32)
        tl.store(s_ptr + n, 1.0 / (1.0 + tl.exp(-g)))


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, num_experts: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, K] fp32, expert ids [N, K] int64), best first. With num_experts = E and
    logits [N, E+1] whose last column is the shared expert's gate: also sigmoid of that column, [N] fp32."""
    N, cols = router_logits.shape
    E = num_experts or cols
    dev = router_logits.device
    weights = torch.empty(N, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=dev)
    shared = torch.empty(N, dtype=torch.float32, device=dev) if cols > E else None
    if N:
        _route_kernel[(N,)](
            router_logits,
            weights,
            ids,
            weights if shared is None else shared,
            router_logits.stride(0),
            E,
            K=top_k,
            KP=triton.next_power_of_2(top_k),
            RENORM=renormalize,
            SHARED=shared is not None,
            BE=triton.next_power_of_2(E),
        )
    return (weights, ids) if shared is None else (weights, ids, shared)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w13_ptr,
    ids_ptr,
    sg_ptr,
    su_ptr,
    h_ptr,
    s13_ptr,
    sgs_ptr,
    sus_ptr,
    H,
    I,
    K: tl.constexpr,
    SHARED: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    FP32: tl.constexpr,
    FP8: tl.constexpr = False,
    EMULATE: tl.constexpr = False,
):
    KS: tl.constexpr = K + 1 if SHARED else K  # slots per token: its K experts, then the shared one
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    token = pair // KS
    k = pair % KS
    e = tl.load(ids_ptr + token * K + tl.minimum(k, K - 1)).to(tl.int64)
    g_base = w13_ptr + e * (2 * I * H)
    u_base = g_base + I * H
    if FP8:  # block scales: [2 NBI, GH] per expert (gate block rows, then up), [NBI, GH] per shared projection
        GB: tl.constexpr = 128  # block = activation group
        NG: tl.constexpr = BC // GB
        GH = (H + GB - 1) // GB
        NBI = (I + GB - 1) // GB
        gs_base = s13_ptr + e * (2 * NBI * GH)
        us_base = gs_base + NBI * GH
    if SHARED:
        if k == K:
            g_base = sg_ptr
            u_base = su_ptr
            if FP8:
                gs_base = sgs_ptr
                us_base = sus_ptr
    mr = rows < I
    acc_g = tl.zeros([BR], dtype=tl.float32)
    acc_u = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, H, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < H
        xv = tl.load(x_ptr + token * H + cols, mask=mc, other=0.0).to(tl.float32)
        m = mr[:, None] & mc[None, :]
        wg = tl.load(g_base + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(u_base + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if FP8:
            # x quantised per 128 channels (BC holds whole groups), then per group: (sum wq xq) * xs * ws
            xq, xs = quantize_tile(tl.reshape(xv, [NG, GB]), 1, EMULATE)
            x3 = tl.reshape(xq.to(tl.float32), [1, NG, GB])
            grp = c0 // GB + tl.arange(0, NG)
            sidx = (rows // GB)[:, None] * GH + grp[None, :]
            sm = mr[:, None] & (grp < GH)[None, :]
            ws_g = tl.load(gs_base + sidx, mask=sm, other=0.0) * xs[None, :]
            ws_u = tl.load(us_base + sidx, mask=sm, other=0.0) * xs[None, :]
            acc_g += tl.sum(tl.sum(tl.reshape(wg, [BR, NG, GB]) * x3, 2) * ws_g, 1)
            acc_u += tl.sum(tl.sum(tl.reshape(wu, [BR, NG, GB]) * x3, 2) * ws_u, 1)
        else:
            acc_g += tl.sum(wg * xv[None, :], 1)
            acc_u += tl.sum(wu * xv[None, :], 1)
    if FP8:  # ops/fp8.experts_reference's roundings: GEMM outputs, SiLU, product (h is quantised from these)
        ty = h_ptr.dtype.element_ty
        acc_g = round_to(acc_g, ty, EMULATE)
        acc_u = round_to(acc_u, ty, EMULATE)
        h = round_to(round_to(acc_g / (1.0 + tl.exp(-acc_g)), ty, EMULATE) * acc_u, ty, EMULATE)
    else:
        if not FP32:  # the grouped GEMM's outputs are in the model dtype before the activation
            acc_g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
            acc_u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + pair * I + rows, h.to(h_ptr.dtype.element_ty), mask=mr)


@triton.jit
def _down_pair(
    h_ptr, w2_ptr, ids_ptr, wts_ptr, sd_ptr, s_ptr, s2_ptr, sds_ptr, token, k, rows, mr, H, I, K, SHARED, BR, BC,
    OUT_TY, FP8, EMULATE,
):  # fmt: skip
    """Slot k of a token: w * (h W_down^T) for BR output rows, rounded to the model dtype before the weight (as
    the grouped GEMM's output is). FP8: h quantised per 128 channels here (BC holds whole groups)."""
    KS: tl.constexpr = K + 1 if SHARED else K
    kk = tl.minimum(k, K - 1)
    e = tl.load(ids_ptr + token * K + kk).to(tl.int64)
    wt = tl.load(wts_ptr + token * K + kk).to(tl.float32)
    base = w2_ptr + e * (H * I)
    if FP8:  # block scales [NBH, GI] per expert and for the shared down projection
        GB: tl.constexpr = 128
        NG: tl.constexpr = BC // GB
        GI = (I + GB - 1) // GB
        s_base = s2_ptr + e * (((H + GB - 1) // GB) * GI)
    if SHARED:
        if k == K:
            base = sd_ptr
            wt = tl.load(s_ptr + token)
            if FP8:
                s_base = sds_ptr
    hrow = h_ptr + (token * KS + k) * I
    y = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, I, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < I
        hv = tl.load(hrow + cols, mask=mc, other=0.0).to(tl.float32)
        w = tl.load(base + rows[:, None] * I + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
        if FP8:
            hq, hs = quantize_tile(tl.reshape(hv, [NG, GB]), 1, EMULATE)
            grp = c0 // GB + tl.arange(0, NG)
            sc = tl.load(s_base + (rows // GB)[:, None] * GI + grp[None, :], mask=mr[:, None] & (grp < GI)[None, :])
            part = tl.sum(tl.reshape(w.to(tl.float32), [BR, NG, GB]) * tl.reshape(hq.to(tl.float32), [1, NG, GB]), 2)
            y += tl.sum(part * sc * hs[None, :], 1)
        else:
            y += tl.sum(w.to(tl.float32) * hv[None, :], 1)
    return wt * y.to(OUT_TY).to(tl.float32)


@triton.jit
def _down_kernel(
    h_ptr,
    w2_ptr,
    ids_ptr,
    wts_ptr,
    sd_ptr,
    s_ptr,
    out_ptr,
    s2_ptr,
    sds_ptr,
    H,
    I,
    K: tl.constexpr,
    SHARED: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    UNROLL: tl.constexpr,
    FP8: tl.constexpr = False,
    EMULATE: tl.constexpr = False,
):
    KS: tl.constexpr = K + 1 if SHARED else K
    token = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)  # output features
    mr = rows < H
    acc = tl.zeros([BR], dtype=tl.float32)
    ty = out_ptr.dtype.element_ty
    args = (h_ptr, w2_ptr, ids_ptr, wts_ptr, sd_ptr, s_ptr, s2_ptr, sds_ptr, token)
    if UNROLL:  # the slots' loads are independent: unrolled, they can all be in flight at once
        for k in tl.static_range(KS):
            acc += _down_pair(*args, k, rows, mr, H, I, K, SHARED, BR, BC, ty, FP8, EMULATE)
    else:
        for k in range(KS):
            acc += _down_pair(*args, k, rows, mr, H, I, K, SHARED, BR, BC, ty, FP8, EMULATE)
    tl.store(out_ptr + token * H + rows, acc.to(ty), mask=mr)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tiles: dict | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """sum_k weights[n,k] * expert_{ids[n,k]}(x[n]); x [N, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous).

    shared = (gate_proj [I, H], up_proj [I, H], down_proj [H, I], gate [N] fp32): the shared expert joins as one
    more slot per token, weighted by gate, in the same two launches (its intermediate size must be I).
    Block FP8 (w13_scale [E, 2 ceil(I/128), ceil(H/128)], w2_scale [E, ceil(H/128), ceil(I/128)], block (128, 128);
    with `shared`, shared_scales for its three projections): weights read as one byte each, x and h quantised per
    128 channels inside the kernels; the numerics of ops/fp8.experts_reference."""
    assert w13.is_contiguous() and w2.is_contiguous(), "expert weights are indexed by raw offsets"
    fp8 = w13_scale is not None
    if fp8 and not fp8_triton.supports(block):
        raise ValueError(f"the FP8 expert kernels take blocks {fp8_triton.BLOCK}, got {block}")
    if fp8 and shared is not None and shared_scales is None:
        raise ValueError("FP8 experts with a shared slot need the shared expert's scales")
    x = x.contiguous()
    N, H = x.shape
    K, inter = ids.shape[1], w2.shape[-1]
    out = torch.empty_like(x)
    if N == 0:
        return out
    ids, weights = ids.contiguous(), weights.contiguous()
    if shared is not None:
        sg, su, sd, s = (t.contiguous() for t in shared)
        assert sg.shape == (inter, H) and sd.shape == (H, inter), "the shared expert must have the experts' size"
    else:
        sg = su = sd = s = weights  # never read
    s13, s2 = (w13_scale.contiguous(), w2_scale.contiguous()) if fp8 else (weights, weights)  # else never read
    sgs, sus, sds = (t.contiguous() for t in shared_scales) if fp8 and shared is not None else (s13, s13, s2)
    KS = K + (shared is not None)
    h = torch.empty(N * KS, inter, dtype=x.dtype, device=x.device)
    t = (TILES if N > 2 else TILES_TINY_BATCH) | (TILES_FP8 if fp8 else {}) | (tiles or {})
    fp32 = x.dtype == torch.float32
    bc_h, bc_i = min(t["gu_cols"], triton.next_power_of_2(H)), min(t["down_cols"], triton.next_power_of_2(inter))
    if fp8:  # a column chunk holds whole quantisation groups
        bc_h, bc_i = max(bc_h, fp8_triton.GROUP), max(bc_i, fp8_triton.GROUP)
    emulate = fp8 and fp8_triton.interpreted()
    _gate_up_kernel[(N * KS, triton.cdiv(inter, t["gu_rows"]))](
        x,
        w13,
        ids,
        sg,
        su,
        h,
        s13,
        sgs,
        sus,
        H,
        inter,
        K=K,
        SHARED=shared is not None,
        BR=t["gu_rows"],
        BC=bc_h,
        FP32=fp32,
        FP8=fp8,
        EMULATE=emulate,
        num_warps=t["gu_warps"],
    )
    _down_kernel[(N, triton.cdiv(H, t["down_rows"]))](
        h,
        w2,
        ids,
        weights,
        sd,
        s,
        out,
        s2,
        sds,
        H,
        inter,
        K=K,
        SHARED=shared is not None,
        BR=t["down_rows"],
        BC=bc_i,
        UNROLL=t["down_unroll"],
        FP8=fp8,
        EMULATE=emulate,
        num_warps=t["down_warps"],
    )
    return out


# ---- large batches: the element-wise steps around the grouped GEMMs (moe.grouped_experts) ----


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, I, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    # torch rounds SiLU(g) to the model dtype before the product
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (a * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(h: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up in one pass: h [M, 2I] holding (gate | up), or gate h [M, I] and up [M, I] apart."""
    gate, up = (h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]) if up is None else (h, up)
    gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    M, I = gate.shape
    out = torch.empty(M, I, dtype=gate.dtype, device=gate.device)
    if M:
        block = min(1024, triton.next_power_of_2(I))
        _silu_mul_kernel[(M, triton.cdiv(I, block))](gate, up, out, I, gate.stride(0), up.stride(0), BLOCK=block)
    return out


@triton.jit
def _combine_kernel(
    y_ptr, inv_ptr, w_ptr, s_ptr, sg_ptr, out_ptr, H,
    K: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr, SHARED: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        if GATHER:
            row = tl.load(inv_ptr + n * K + k).to(tl.int64)
        else:
            row = n.to(tl.int64) * K + k
        wt = tl.load(w_ptr + n * K + k).to(tl.float32)
        acc += wt * tl.load(y_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
    if SHARED:  # + gate[n] * shared[n]
        acc += tl.load(sg_ptr + n).to(tl.float32) * tl.load(s_ptr + n * H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * H + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def combine(
    y: torch.Tensor,
    inverse: torch.Tensor | None,
    weights: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """out[n] = sum_k weights[n, k] * y[inverse[n*K + k]]: each token's K expert outputs (rows of y, which is
    sorted by expert) gathered, weighted and summed in fp32 in one pass. y [N*K, H]; weights [N, K].
    inverse None: y is already in (token, k) order. shared (s [N, H], gate [N]): adds gate[n] * s[n]."""
    N, K = weights.shape
    H = y.shape[1]
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    s, sg = (y, weights) if shared is None else (shared[0].contiguous(), shared[1].contiguous())
    if N:
        block = min(1024, triton.next_power_of_2(H))
        _combine_kernel[(N, triton.cdiv(H, block))](
            y.contiguous(), y if inverse is None else inverse.contiguous(), weights.contiguous(), s, sg, out, H,
            K=K, BLOCK=block, GATHER=inverse is not None, SHARED=shared is not None,
        )  # fmt: skip
    return out
