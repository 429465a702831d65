"""Block-FP8 kernels on CUDA (Triton): activation quantisation and the w8a8 linear, with the numerics of
`ops/fp8.py` (read its docstring first). The MoE kernels' FP8 branches (moe_triton, moe_grouped_triton) use the
helpers `quantize_tile` and `to_e4m3` from here.

- quantize_act: one program per (BLOCK_M rows, one group): absmax, scale = max(absmax, EPS) / 448 and
  x / scale with IEEE division (`div_rn`: Triton's plain `/` is an approximate division on the GPU) and a
  saturating round-to-nearest-even cast: bit-equal to the torch reference.
- linear: x quantised first (quantize_act), then by M:
  * M <= GEMV_MAX_M (one token): a GEMV over BR weight rows per program, the fp8 weights widened in registers,
    per 128-group partial sums scaled by xs * ws;
  * larger M: a tiled GEMM with tl.dot on fp8 operands; BLOCK_K = 128 = the activation group = the weight block's
    width, so every K tile has one activation scale per row and one weight scale per column block; each tile's fp32
    product is scaled and added to the fp32 accumulator (per-tile promotion: Hopper's fp8 MMA accumulates with
    fewer bits than fp32 across a long K);
  * from SCALED_MM_MIN_M rows, torch's block-scaled `scaled_mm` (cuBLAS) where it is probed to work: twice the
    Triton GEMM's rate when compute-bound on an H100.
  (A first version quantised x in the GEMM's prologue for small M: 2.5-10x slower than this GEMV on an H100.)
Only blocks (128, 128) are handled (`supports`); `ops/fp8.py` falls back to the torch reference otherwise.
Nothing syncs with the host after the first large-M call (which probes scaled_mm once): decode is capturable.
Legend: M rows (tokens), K input features, N output features, G = ceil(K / 128) groups.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8_DTYPE = torch.float8_e4m3fn
GROUP = 128  # activation group = weight block: the only block size the kernels take
BLOCK = (GROUP, GROUP)

# Measured on an H100 SXM (nextserve/bench/fp8_kernels.py --sweep, Qwen3-Next shapes, us per call):
# - GEMV at one token: BC = 2048 beats 1024 (10.2 vs 14.4 at 12288x2048, 7.6 vs 9.0 at 2048x4096); at 4 tokens it
#   already loses to the dot GEMM's 16-row tile (21.4 vs 10.9 at 12288x2048), so it serves M = 1 only.
# - dot GEMM: 16x32 with 6 stages up to 32 rows (11.7 at 2048x4096, 7.3 at 512x2048), 16x64 for wide N (10.9 at
#   12288x2048, M = 16); 64x64 from 33 to 127 rows; 64x128 at 8192 rows (683 vs 689 for 128x128, 8 warps).
# - scaled_mm beat the dot GEMM from M = 128 on (11.2 vs 17.3 at 12288x2048; 1226 vs 646 TF/s at 8192^3).
GEMV_MAX_M = 1
GEMV_TILE = dict(BR=4, BC=2048, num_warps=4)
LINEAR_TILES = (  # (max M, tile) for the dot GEMM; wide N (>= WIDE_N) takes BLOCK_N = 64 with 4 stages up to 32 rows
    (32, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=6)),
    (128, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)),
    (None, dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)),
)
WIDE_N = 8192
GROUP_M = 8  # row tiles that share a column band (L2 reuse of the weight tiles)
# From this many rows on, torch's block-scaled scaled_mm serves the linear when it works (None: never).
SCALED_MM_MIN_M: int | None = 128


def supports(block: tuple[int, int], N: int | None = None, K: int | None = None) -> bool:
    """Whether the Triton kernels take this block size (any N and K do: edges are masked)."""
    return tuple(block) == BLOCK


@triton.jit
def to_e4m3(v, EMULATE: tl.constexpr):
    """fp32 values (already clamped to +-448) -> float8e4nv, round to nearest even. EMULATE: round in fp32
    arithmetic first so that the cast is exact (Triton's interpreter does not carry the mantissa into the exponent
    when it rounds up, e.g. 125.2 -> 64 instead of 128)."""
    if EMULATE:
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3  # exponent of one e4m3 ulp at v (subnormals: 2^-9)
        ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
        y = ((tl.abs(v) / ulp + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: rint in fp32
        v = (y.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # sign (and -0)
    return v.to(tl.float8e4nv)


@triton.jit
def round_to(x, DT: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> DT -> fp32, round to nearest even. EMULATE: bf16 by bit arithmetic (the interpreter truncates)."""
    if EMULATE and DT == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    return x.to(DT).to(tl.float32)


@triton.jit
def quantize_tile(x, AXIS: tl.constexpr, EMULATE: tl.constexpr):
    """x fp32 2-D, one quantisation group along AXIS (its whole extent) -> (q fp8, scale fp32 over the other
    axis). The formula of ops/fp8.quantize_act: scale = max(absmax, 1e-10) / 448, q = e4m3(x / scale)."""
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), AXIS), 1e-10), 448.0)
    sb = s[:, None] if AXIS == 1 else s[None, :]
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, sb), -448.0), 448.0)
    return to_e4m3(q, EMULATE), s


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mr = rows < M
    m = mr[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
    q, s = quantize_tile(x, 1, EMULATE)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=m)
    tl.store(s_ptr + rows64 * stride_sm + g * stride_sg, s, mask=mr)


def quantize_act(x: torch.Tensor, group: int = GROUP, m_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] floating -> (xq [M, K] float8_e4m3fn, xs [M, G] fp32): ops/fp8.quantize_act on the GPU, bit-equal.
    m_major: xs is stored column-major (stride (1, M)), as cuBLAS' block-scaled GEMM wants it."""
    if group < 16 or group & (group - 1):
        raise ValueError(f"FP8 activation group must be a power of two >= 16, got {group}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    G = triton.cdiv(K, group)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = (
        torch.empty(G, M, dtype=torch.float32, device=x.device).t()
        if m_major
        else x.new_empty(M, G, dtype=torch.float32)
    )
    if M and K:
        block_m = 16
        _quantize_kernel[(triton.cdiv(M, block_m), G)](
            x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
            BLOCK_M=block_m, GROUP=group, EMULATE=_INTERPRET,
        )  # fmt: skip
    return q, s


@triton.jit
def dot_fp8(a, b, UPCAST: tl.constexpr):
    """a @ b of fp8 tiles, in fp32. UPCAST: multiplied in fp32 (the interpreter has no fp8 matmul)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _linear_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, M, N, K,
    stride_am, stride_asm, stride_asg, stride_wn, stride_wsn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BN_SCALE: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out = (a as) (w ws)^T with a fp8 [M, K], as [M, G]. One K tile = one scale group (BLOCK_K == 128)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles walk the same column band, so its weight tiles stay in L2
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm, mn = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn64[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]: w^T's tile
    as_ptrs = as_ptr + rm64 * stride_asm
    ws_ptrs = ws_ptr + (rn // BN_SCALE) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCK_K
        mk = rk < K - k0
        a = tl.load(a_ptrs, mask=mm[:, None] & mk[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_asg, mask=mm, other=0.0)
        w = tl.load(w_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
        w_s = tl.load(ws_ptrs + kb, mask=mn, other=0.0)
        acc += dot_fp8(a, w, UPCAST) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = out_ptr + rm64[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _gemv_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, M, N, K,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_om,
    BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """out[m, rows] for BR weight rows and every token m < M <= BM: each [BR, BC] weight chunk is read once and
    multiplied with every token's quantised chunk; per 128-group sums scaled by xs * ws."""
    GB: tl.constexpr = 128
    NG: tl.constexpr = BC // GB
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    ms = tl.arange(0, BM)
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for c0 in range(0, K, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < K
        w = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
        w3 = tl.reshape(w.to(tl.float32), [BR, NG, GB])
        grp = c0 // GB + tl.arange(0, NG)
        mg = grp * GB < K
        ws_ptrs = ws_ptr + (rows // GB)[:, None] * stride_wsn + grp[None, :]
        ws = tl.load(ws_ptrs, mask=mr[:, None] & mg[None, :], other=0.0)
        for m in tl.static_range(BM):
            xq = tl.load(a_ptr + m * stride_am + cols, mask=mc & (m < M), other=0.0).to(tl.float32)
            xs = tl.load(as_ptr + m * stride_asm + grp, mask=mg & (m < M), other=0.0)
            part = tl.sum(w3 * tl.reshape(xq, [1, NG, GB]), 2)  # [BR, NG]
            y = tl.sum(part * ws * xs[None, :], 1)  # [BR]
            acc = tl.where(ms[:, None] == m, acc + y[None, :], acc)
    out = out_ptr + ms[:, None] * stride_om + rows64[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & mr[None, :])


def linear_tile(M: int, N: int = 0) -> dict:
    """The dot GEMM's tile for M rows and N output features (LINEAR_TILES)."""
    tile = next(t for m, t in LINEAR_TILES if m is None or M <= m)
    if tile["BLOCK_M"] == 16 and N >= WIDE_N:
        tile = tile | dict(BLOCK_N=64, num_stages=4)
    return tile


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int]) -> None:
    if not supports(block):
        raise ValueError(f"the FP8 Triton kernels take blocks {BLOCK}, got {tuple(block)}")
    N, K = w.shape
    if (
        x.shape[1] != K
        or w.dtype != FP8_DTYPE
        or tuple(w_scale.shape) != (triton.cdiv(N, GROUP), triton.cdiv(K, GROUP))
    ):
        raise ValueError(
            f"FP8 linear: x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}, w_scale {tuple(w_scale.shape)} "
            f"do not fit block {BLOCK}"
        )


def linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int], tile: dict | None = None
) -> torch.Tensor:
    """y = x W^T; x [M, K] bf16/fp16/fp32, W [N, K] float8_e4m3fn with fp32 scales [ceil(N/128), ceil(K/128)]
    -> [M, N] in x's dtype. The numerics of ops/fp8.linear_reference (sums in another order).
    tile (sweeps, tests): a dot GEMM tile, or a GEMV tile (keys BR, BC, num_warps), instead of the choice by M."""
    _check(x, w, w_scale, block)
    M, K = x.shape
    N = w.shape[0]
    if w.stride(-1) != 1:
        w = w.contiguous()
    w_scale = w_scale.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if tile is None and _use_scaled_mm(M, N, K, x):
        xq, xs = quantize_act(x, GROUP, m_major=True)
        return _scaled_mm(xq, xs, w, w_scale, x.dtype)
    xq, xs = quantize_act(x, GROUP)
    if (tile is None and M <= GEMV_MAX_M) or (tile is not None and "BR" in tile):
        t = dict(tile or GEMV_TILE)
        br, bc = t.pop("BR"), max(GROUP, min(t.pop("BC"), triton.next_power_of_2(K)))
        _gemv_kernel[(triton.cdiv(N, br),)](
            xq, xs, w, w_scale, out, M, N, K, xq.stride(0), xs.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
            BM=triton.next_power_of_2(M), BR=br, BC=bc, **t,
        )  # fmt: skip
        return out
    t = dict(tile or linear_tile(M, N))
    bm, bn = t.pop("BLOCK_M"), t.pop("BLOCK_N")
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_kernel[grid](
        xq, xs, w, w_scale, out, M, N, K,
        xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0), w_scale.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=GROUP, BN_SCALE=GROUP, GROUP_M=GROUP_M, UPCAST=_INTERPRET, **t,
    )  # fmt: skip
    return out


# ---- torch's block-scaled GEMM (cuBLAS, CUDA >= 12.9 on sm90): probed once, used for large M if faster ----

_SCALED_MM_OK: bool | None = None  # None: not probed yet


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype):
    """xq [M, K] fp8, xs [M, G] fp32 (column-major), w [N, K] fp8, ws [N/128, G] -> [M, N] (1x128 x 128x128)."""
    F = torch.nn.functional
    return F.scaled_mm(
        xq, w.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128, output_dtype=dtype
    )


def scaled_mm_works(device: torch.device | str = "cuda") -> bool:
    """Whether torch's block-scaled scaled_mm runs here and agrees with the reference (probed once; syncs)."""
    global _SCALED_MM_OK
    if _SCALED_MM_OK is None:
        _SCALED_MM_OK = False
        try:
            from nextserve.loader.fp8 import quantize_block_fp8
            from nextserve.ops.fp8 import linear_reference

            g = torch.Generator(device="cpu").manual_seed(0)
            M, N, K = 64, 384, 512
            x = torch.randn(M, K, generator=g).to(torch.bfloat16).to(device)
            w, ws = quantize_block_fp8(torch.randn(N, K, generator=g).to(device), BLOCK)
            xq, xs = quantize_act(x, GROUP, m_major=True)
            y = _scaled_mm(xq, xs, w, ws, torch.bfloat16).float()
            ref = linear_reference(x, w, ws, BLOCK).float()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            _SCALED_MM_OK = err < 2e-2
            log.info(
                "block-FP8 scaled_mm on %s: %s (max rel err %.1e)", device, "works" if _SCALED_MM_OK else "wrong", err
            )
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            log.info("block-FP8 scaled_mm unavailable (%s: %s); Triton serves every M", type(e).__name__, e)
    return _SCALED_MM_OK


def _use_scaled_mm(M: int, N: int, K: int, x: torch.Tensor) -> bool:
    """Large M, cuBLAS' alignment (M % 4, N % 128, K % 512: its K-block count must be a multiple of 4), and probed
    to work. The probe syncs, so it never runs during a CUDA-graph capture (which then takes Triton)."""
    if SCALED_MM_MIN_M is None or M < SCALED_MM_MIN_M or M % 4 or N % 128 or K % 512 or _INTERPRET:
        return False
    if _SCALED_MM_OK is None and torch.cuda.is_current_stream_capturing():
        return False
    return scaled_mm_works(x.device)


def measure_fp8_matmul_tflops(device: torch.device | str = "cuda", n: int = 8192, iters: int = 20) -> dict:
    """Dense block-FP8 GEMM rate at n^3 (activation quantisation included): best of Triton and scaled_mm.
    Returns {"triton": TFLOP/s, "scaled_mm": TFLOP/s or None, "best": TFLOP/s}."""
    from nextserve.loader.fp8 import quantize_block_fp8

    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    w, ws = quantize_block_fp8(torch.randn(n, n, device=device) * 0.02, BLOCK)
    flops = 2 * n**3
    res = {"triton": flops / _time(lambda: linear(x, w, ws, BLOCK, tile=linear_tile(n)), iters) / 1e12}
    res["scaled_mm"] = None
    if scaled_mm_works(device):

        def run():
            xq, xs = quantize_act(x, GROUP, m_major=True)
            return _scaled_mm(xq, xs, w, ws, x.dtype)

        res["scaled_mm"] = flops / _time(run, iters) / 1e12
    res["best"] = max(v for v in res.values() if v is not None)
    return res


def _time(fn, iters: int = 20) -> float:
    """Seconds per call (CUDA events, after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (which needs the fp8 emulation and fp32 dots)."""
    return _INTERPRET
