"""Routed experts for prefill-sized batches: two grouped-GEMM Triton kernels over expert-aligned blocks.

The (token, k) pairs are sorted by expert and each expert's run is padded to whole blocks of BLOCK_M rows, so that
a program multiplies rows of one expert only. The layout is built on the device with an upper bound on the number
of blocks known on the host (nothing waits for the GPU, so a CUDA graph can hold it); blocks past the end exit at
once.

- gate_up: gathers each row's token from x itself (no gathered copy of the inputs), multiplies by the expert's gate
  and up rows into two accumulators, and writes SiLU(gate) * up: the [pairs, 2I] intermediate never exists.
- down: multiplies by the expert's down rows and writes each row at its pair's place in (token, k) order, so the
  combine is a plain weighted sum over k (moe_triton.combine without an inverse permutation).

Legend: N tokens, K experts per token, H hidden, E experts, I expert intermediate size, P = N*K pairs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nextserve.ops import fp8_triton, moe_triton
from nextserve.ops.fp8_triton import dot_fp8, quantize_tile, round_to

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tiles at Qwen3-Next shapes (E=512, H=2048, I=512) on an H100: see docs/kernels.md for the sweep.
BLOCK_M = 128
GATE_UP_TILE = dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
DOWN_TILE = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
# Block FP8: BLOCK_K = 128 (one activation and one weight scale per K tile); the gate_up tile's BLOCK_N = 128 is one
# quantisation group of the intermediate, which its epilogue quantises (fp8 act + scales for the down kernel).
# Measured on an H100 at 8K tokens x top-10 (nextserve/bench/fp8_kernels.py).
BLOCK_M_FP8 = 64
GATE_UP_TILE_FP8 = dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
DOWN_TILE_FP8 = dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)


@triton.jit
def _rank_kernel(ids_ptr, count_ptr, rank_ptr, P, BLOCK: tl.constexpr):
    """count[e] = pairs of expert e; rank[p] = the place of pair p among its expert's pairs (any order: a row's
    result does not depend on the rows beside it)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < P
    e = tl.load(ids_ptr + p, mask=m, other=0)
    tl.store(rank_ptr + p, tl.atomic_add(count_ptr + e, 1, mask=m), mask=m)


@triton.jit
def _offsets_kernel(count_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """offsets[0, e] = expert e's first row; offsets[1, e] = the end of its blocks (a prefix sum over experts)."""
    ex = tl.arange(0, BLOCK_E)
    m = ex < E
    nblk = (tl.load(count_ptr + ex, mask=m, other=0) + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(nblk, 0)
    tl.store(offsets_ptr + ex, (block_end - nblk) * BLOCK_M, mask=m)
    tl.store(offsets_ptr + E + ex, block_end, mask=m)


@triton.jit
def _place_kernel(
    ids_ptr, count_ptr, rank_ptr, offsets_ptr, rows_ptr, block_expert_ptr, P, E, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Each program: its BLOCK_P pairs to their rows; then, for its BLOCK_B blocks, the block's expert and -1 on the
    block's padding rows (rows no pair takes, so the two kinds of store never meet)."""
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < P
    e = tl.load(ids_ptr + p, mask=mp, other=0)
    row = tl.load(offsets_ptr + e, mask=mp, other=0) + tl.load(rank_ptr + p, mask=mp, other=0)
    tl.store(rows_ptr + row, p, mask=mp)
    ex = tl.arange(0, BLOCK_E)
    block_end = tl.load(offsets_ptr + E + ex, mask=ex < E, other=NUM_BLOCKS)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = b < NUM_BLOCKS
    # the expert of block b: how many experts' blocks end at or before it; -1 past the last expert's blocks
    eb = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
    used = mb & (eb < E)
    tl.store(block_expert_ptr + b, tl.where(used, eb, -1), mask=mb)
    # padding rows of a used block: from its expert's first row + count on
    fill_from = tl.load(offsets_ptr + eb, mask=used, other=0) + tl.load(count_ptr + eb, mask=used, other=0)
    r = b[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    tl.store(rows_ptr + r, -1, mask=used[:, None] & (r >= fill_from[:, None]))


def block_layout(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, K] -> (rows [B*block_m] int32: the pair index at each padded row, -1 on padding;
    block_expert [B] int32: each block's expert, -1 past the last used block). B is the host-side bound
    cdiv(P, block_m) + min(E, P): each expert with pairs adds at most one partly filled block. Rows of blocks past
    the end are left unwritten (the kernels skip those blocks). Four launches, no host sync."""
    P, E, dev = ids.numel(), num_experts, ids.device
    num_blocks = triton.cdiv(P, block_m) + min(E, P)
    ids = ids.contiguous().view(-1)
    count = torch.zeros(E, dtype=torch.int32, device=dev)
    rank = torch.empty(P, dtype=torch.int32, device=dev)
    offsets = torch.empty(2, E, dtype=torch.int32, device=dev)
    rows = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(E)
    _rank_kernel[(triton.cdiv(P, 1024),)](ids, count, rank, P, BLOCK=1024)
    _offsets_kernel[(1,)](count, offsets, E, BLOCK_M=block_m, BLOCK_E=block_e)
    block_p, block_b = 1024, 16
    grid = max(triton.cdiv(P, block_p), triton.cdiv(num_blocks, block_b))
    _place_kernel[(grid,)](
        ids, count, rank, offsets, rows, block_expert, P, E, num_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_P=block_p, BLOCK_B=block_b,
    )  # fmt: skip
    return rows, block_expert


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: in fp32, for Triton's interpreter, which multiplies bf16 tiles as raw bits."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, rows_ptr, block_expert_ptr, act_ptr, H, I, K_TOP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    xs_ptr=None, ws_ptr=None, acts_ptr=None, FP8: tl.constexpr = False, F16: tl.constexpr = False,
):  # fmt: skip
    """FP8: x is fp8 with scales xs [N, GH]; ws = w13's scales [E, 2 NBI, GH]; act is written as fp8 with scales
    acts [rows, GI] (this tile's BLOCK_N columns are one group); BLOCK_K divides 128."""
    pid = tl.program_id(0)
    n_blocks = I // BLOCK_N
    mb, nb = pid // n_blocks, pid % n_blocks  # the column blocks of one row block run side by side (L2 reuse of x)
    e = tl.load(block_expert_ptr + mb)
    if e < 0:
        return
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + m)
    valid = pair >= 0
    token = tl.where(valid, pair // K_TOP, 0).to(tl.int64)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * H + k[None, :]
    g_ptrs = w13_ptr + e.to(tl.int64) * 2 * I * H + n[None, :] * H + k[:, None]  # [BLOCK_K, BLOCK_N]: gate rows
    u_ptrs = g_ptrs + I * H  # up rows
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FP8:
        GH = (H + 127) // 128
        NBI = (I + 127) // 128
        xs_ptrs = xs_ptr + token * GH
        wsg_ptrs = ws_ptr + e.to(tl.int64) * 2 * NBI * GH + (n // 128) * GH
        wsu_ptrs = wsg_ptrs + NBI * GH
        for k0 in range(0, H, BLOCK_K):
            mk = k < H - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & mk[None, :], other=0.0)
            a_s = tl.load(xs_ptrs + k0 // 128, mask=valid, other=0.0)[:, None]
            acc_g += (
                dot_fp8(a, tl.load(g_ptrs, mask=mk[:, None], other=0.0), UPCAST)
                * a_s
                * tl.load(wsg_ptrs + k0 // 128)[None, :]
            )
            acc_u += (
                dot_fp8(a, tl.load(u_ptrs, mask=mk[:, None], other=0.0), UPCAST)
                * a_s
                * tl.load(wsu_ptrs + k0 // 128)[None, :]
            )
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        # ops/fp8.experts_reference's roundings (GEMM outputs, SiLU and the product each in the model dtype), then
        # the row's quantisation group (this tile's columns) to fp8
        dt: tl.constexpr = tl.float16 if F16 else tl.bfloat16
        g = round_to(acc_g, dt, UPCAST)
        u = round_to(acc_u, dt, UPCAST)
        h = round_to(round_to(g / (1.0 + tl.exp(-g)), dt, UPCAST) * u, dt, UPCAST)
        q, h_s = quantize_tile(h, 1, UPCAST)
        tl.store(act_ptr + m.to(tl.int64)[:, None] * I + n[None, :], q)
        tl.store(acts_ptr + m.to(tl.int64) * ((I + 127) // 128) + nb, h_s)
    else:
        for _ in range(0, H, BLOCK_K):
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            acc_g = _dot(a, tl.load(g_ptrs), acc_g, UPCAST)
            acc_u = _dot(a, tl.load(u_ptrs), acc_u, UPCAST)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(act_ptr + m.to(tl.int64)[:, None] * I + n[None, :], act.to(act_ptr.dtype.element_ty))


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, rows_ptr, block_expert_ptr, y_ptr, H, I,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    acts_ptr=None, ws_ptr=None, FP8: tl.constexpr = False,
):  # fmt: skip
    """FP8: act is fp8 with scales acts [rows, GI]; ws = w2's scales [E, NBH, GI]; BLOCK_K divides 128."""
    pid = tl.program_id(0)
    n_blocks = H // BLOCK_N
    mb, nb = pid // n_blocks, pid % n_blocks
    e = tl.load(block_expert_ptr + mb)
    if e < 0:
        return
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + m)
    valid = pair >= 0
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + m.to(tl.int64)[:, None] * I + k[None, :]
    w_ptrs = w2_ptr + e.to(tl.int64) * H * I + n[None, :] * I + k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FP8:
        GI = (I + 127) // 128
        as_ptrs = acts_ptr + m.to(tl.int64) * GI
        ws_ptrs = ws_ptr + e.to(tl.int64) * ((H + 127) // 128) * GI + (n // 128) * GI
        for k0 in range(0, I, BLOCK_K):
            mk = k < I - k0
            a = tl.load(a_ptrs, mask=mk[None, :], other=0.0)
            scale = tl.load(as_ptrs + k0 // 128)[:, None] * tl.load(ws_ptrs + k0 // 128)[None, :]
            acc += dot_fp8(a, tl.load(w_ptrs, mask=mk[:, None], other=0.0), UPCAST) * scale
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    else:
        for _ in range(0, I, BLOCK_K):
            acc = _dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, UPCAST)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    out = y_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * H + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None])


def _tile(tile: dict, n: int, k: int) -> dict | None:
    """The tile clamped to the problem, or None when it does not divide it (the caller falls back)."""
    bn, bk = min(tile["BLOCK_N"], n), min(tile["BLOCK_K"], k)
    if n % bn or k % bk or bn < 16 or bk < 16:
        return None
    return tile | dict(BLOCK_N=bn, BLOCK_K=bk)


def _tile_fp8(tile: dict, n: int, k: int) -> dict | None:
    """An FP8 tile clamped to the problem: BLOCK_N divides n; BLOCK_K a power of two dividing 128 (K edges are
    masked, so k need not be a multiple); None when it does not fit."""
    bn, bk = min(tile["BLOCK_N"], n), min(tile["BLOCK_K"], triton.next_power_of_2(k))
    if n % bn or bn < 16 or bn & (bn - 1) or bk < 16 or 128 % bk:
        return None
    return tile | dict(BLOCK_N=bn, BLOCK_K=bk)


def supports(H: int, I: int, block: tuple[int, int] | None = None) -> bool:
    """Whether the kernels' tiles divide these sizes (powers of two from 16 up do). Block FP8 (block given): blocks
    of 128 and the gate_up tile one quantisation group of the intermediate (I a multiple of 128, or a power of two
    below it)."""
    if block is not None:
        gu = _tile_fp8(GATE_UP_TILE_FP8, I, H)
        return (
            fp8_triton.supports(block)
            and gu is not None
            and gu["BLOCK_N"] in (128, I)
            and _tile_fp8(DOWN_TILE_FP8, H, I) is not None
        )
    return _tile(GATE_UP_TILE, I, H) is not None and _tile(DOWN_TILE, H, I) is not None


def grouped_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up_tile: dict | None = None,
    down_tile: dict | None = None,
    block_m: int | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]); x [N, H], w13 [E, 2I, H], w2 [E, H, I], weights/ids [N, K].
    shared (s [N, H], gate [N]): gate[n] * s[n] is added in the same combine. Tiles may be given for a sweep; the
    defaults are the tuned ones.
    Block FP8 (w13_scale [E, 2 ceil(I/128), ceil(H/128)], w2_scale [E, ceil(H/128), ceil(I/128)], block (128, 128)):
    x quantised per 128 channels first (fp8_triton.quantize_act), fp8 tl.dot in both kernels, the intermediate
    quantised in the gate_up epilogue; the numerics of ops/fp8.experts_reference."""
    fp8 = w13_scale is not None
    N, K = ids.shape
    E, H, I = w13.shape[0], x.shape[1], w2.shape[-1]
    if fp8:
        if not supports(H, I, block):
            raise ValueError(f"the FP8 grouped expert kernels do not take H={H}, I={I}, block={block}")
        block_m = block_m or BLOCK_M_FP8
        gu = _tile_fp8(gate_up_tile or GATE_UP_TILE_FP8, I, H)
        dn = _tile_fp8(down_tile or DOWN_TILE_FP8, H, I)
        if gu is None or dn is None or gu["BLOCK_N"] not in (128, I):
            raise ValueError(f"FP8 grouped expert tiles do not fit H={H}, I={I}")
    else:
        block_m = block_m or BLOCK_M
        gu = _tile(gate_up_tile or GATE_UP_TILE, I, H)
        dn = _tile(down_tile or DOWN_TILE, H, I)
        if gu is None or dn is None:
            raise ValueError(f"grouped expert tiles do not divide H={H}, I={I}")
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    if N == 0:
        return torch.zeros_like(x) if shared is None else shared[0].clone()
    rows, block_expert = block_layout(ids, E, block_m)
    num_blocks = block_expert.numel()
    y = torch.empty(N * K, H, dtype=x.dtype, device=x.device)
    if fp8:
        xq, xs = fp8_triton.quantize_act(x, fp8_triton.GROUP)
        act = torch.empty(num_blocks * block_m, I, dtype=fp8_triton.FP8_DTYPE, device=x.device)
        act_s = torch.empty(
            num_blocks * block_m, triton.cdiv(I, fp8_triton.GROUP), dtype=torch.float32, device=x.device
        )
        _gate_up_kernel[(num_blocks * (I // gu["BLOCK_N"]),)](
            xq, w13, rows, block_expert, act, H, I, K, BLOCK_M=block_m, UPCAST=_INTERPRET,
            xs_ptr=xs, ws_ptr=w13_scale.contiguous(), acts_ptr=act_s, FP8=True, F16=x.dtype == torch.float16, **gu,
        )  # fmt: skip
        _down_kernel[(num_blocks * (H // dn["BLOCK_N"]),)](
            act, w2, rows, block_expert, y, H, I, BLOCK_M=block_m, UPCAST=_INTERPRET,
            acts_ptr=act_s, ws_ptr=w2_scale.contiguous(), FP8=True, **dn,
        )  # fmt: skip
        return moe_triton.combine(y, None, weights, shared)
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    act = torch.empty(num_blocks * block_m, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks * (I // gu["BLOCK_N"]),)](
        x, w13, rows, block_expert, act, H, I, K, BLOCK_M=block_m, UPCAST=upcast, **gu
    )
    _down_kernel[(num_blocks * (H // dn["BLOCK_N"]),)](
        act, w2, rows, block_expert, y, H, I, BLOCK_M=block_m, UPCAST=upcast, **dn
    )
    return moe_triton.combine(y, None, weights, shared)
