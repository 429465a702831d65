"""Triton paths for the norms of `nextserve.ops.norm` (same contracts, same numerics as the torch references).

Every input is seen as rows [N, D] over its last dim: leading dims are flattened as a view when the strides allow it
(a per-head slice such as `x.view(T, H, 2D).split(D)[0]` does), copied only when they do not. Each program owns a
tile of ROWS whole rows (ROWS > 1 only for small D), reduces in fp32 and writes a contiguous output, so one launch
covers the whole tensor. Nothing depends on tensor values on the host: every call is CUDA-graph capturable.

- `rms_norm`: zero-centred gain, y = cast(x32 * rstd * (1 + w32)).
- `add_rms_norm`: h = cast(residual + x) first (the residual stream's rounding), then the norm of h; one launch.
- `gated_rms_norm`: n = cast(x32 * rstd) to the model dtype, times w (rounded as torch's `w * n` would be), times
  SiLU(z32) in fp32, cast once.

Importing this module needs Triton (norm.py treats an ImportError as "no fast path").
Legend: N rows, D row length (hidden size or head dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 16384  # one row must fit one tile; longer rows stay on the torch reference
_TILE = 1024  # elements per program for small D: rows are packed until a tile holds about this many


def supports(x: torch.Tensor) -> bool:
    """Whether these kernels cover x (dtype and row length); the caller falls back to the reference otherwise."""
    return x.dtype in DTYPES and 0 < x.shape[-1] <= MAX_D


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] with a unit last stride: a view when the leading dims collapse, a copy otherwise."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _config(D: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): a power-of-two row block, rows per program, and warps for a tile of that size."""
    block = triton.next_power_of_2(D)
    rows = max(1, _TILE // block)
    warps = min(8, max(1, block * rows // 256))
    return block, rows, warps


def _check_weight(weight: torch.Tensor, D: int) -> torch.Tensor:
    if weight.shape != (D,):
        raise ValueError(f"norm weight has shape {tuple(weight.shape)}, expected ({D},) for rows of length {D}")
    return weight.contiguous()


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    N,
    D,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK)
    m = (row < N)[:, None] & (col < D)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=m, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row[:, None] * stride_r + col[None, :], mask=m, other=0.0)
        # Round the sum to the stream dtype before the norm reads it, as `residual + x` in torch does.
        x = (r.to(tl.float32) + x.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row[:, None] * D + col[None, :], x, mask=m)
    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # [ROWS]; masked columns add zeros
    w = tl.load(w_ptr + col, mask=col < D, other=0.0).to(tl.float32)
    # Same order as the reference: normalise, then the (1 + w) gain, in fp32; one cast at the end.
    y = (x * rstd[:, None]) * (1.0 + w)[None, :]
    tl.store(y_ptr + row[:, None] * D + col[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def _launch_rms(x2, r2, weight, y, h, eps: float) -> None:
    N, D = x2.shape
    if N == 0:
        return
    block, rows, warps = _config(D)
    _rms_norm_kernel[(triton.cdiv(N, rows),)](
        x2,
        x2 if r2 is None else r2,  # unused when HAS_RESIDUAL is off
        weight,
        y,
        y if h is None else h,
        N,
        D,
        x2.stride(0),
        0 if r2 is None else r2.stride(0),
        eps,
        HAS_RESIDUAL=r2 is not None,
        ROWS=rows,
        BLOCK=block,
        num_warps=warps,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `nextserve.ops.norm.rms_norm`: zero-centred RMSNorm over the last dim, x's dtype out."""
    x2 = _rows(x)
    weight = _check_weight(weight, x2.shape[1])
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, None, weight, y, None, eps)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `nextserve.ops.norm.add_rms_norm`: (rms_norm(residual + x), residual + x) in one launch."""
    assert x.shape == residual.shape and x.dtype == residual.dtype, "checked by the caller"
    x2, r2 = _rows(x), _rows(residual)
    weight = _check_weight(weight, x2.shape[1])
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_rms(x2, r2, weight, y, h, eps)
    return y.view(x.shape), h.view(x.shape)


@triton.jit
def _gated_rms_norm_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    y_ptr,
    N,
    D,
    stride_x,
    Z1,
    Z2,
    z_st0,
    z_st1,
    z_st2,
    eps,
    ROUND_PROD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK)
    m = (row < N)[:, None] & (col < D)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    # NOTE: as in the reference, the normalised value is rounded to the model dtype before the weight multiply.
    n = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < D, other=0.0).to(tl.float32)
    p = n * w[None, :]
    if ROUND_PROD:  # torch's `w * n` gives a 16-bit result when both are that dtype
        p = p.to(y_ptr.dtype.element_ty).to(tl.float32)
    # z's rows sit at three strides (leading dims [Z0, Z1, Z2]): a strided view is read in place
    z_row = (row // (Z1 * Z2)) * z_st0 + ((row // Z2) % Z1) * z_st1 + (row % Z2) * z_st2
    z = tl.load(z_ptr + z_row[:, None] + col[None, :], mask=m, other=0.0).to(tl.float32)
    y = p * (z / (1.0 + tl.exp(-z)))  # SiLU(z) in fp32
    tl.store(y_ptr + row[:, None] * D + col[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `nextserve.ops.norm.gated_rms_norm`: x, z [..., dv], weight [dv]; x's dtype out."""
    assert x.shape == z.shape, "checked by the caller"
    x2 = _rows(x)
    z3 = z if z.stride(-1) == 1 else z.contiguous()
    if z3.dim() > 4:
        z3 = z3.reshape(-1, *z3.shape[-3:])
    while z3.dim() < 4:
        z3 = z3.unsqueeze(0)
    N, D = x2.shape
    weight = _check_weight(weight, D)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if N:
        block, rows, warps = _config(D)
        # The product w * n is rounded to the promoted dtype: x's when that is 16-bit, else it stays fp32.
        prod = torch.promote_types(weight.dtype, x.dtype)
        _gated_rms_norm_kernel[(triton.cdiv(N, rows),)](
            x2,
            z3,
            weight,
            y,
            N,
            D,
            x2.stride(0),
            z3.shape[1],
            z3.shape[2],
            *z3.stride()[:3],
            eps,
            ROUND_PROD=prod == x.dtype and x.dtype != torch.float32,
            ROWS=rows,
            BLOCK=block,
            num_warps=warps,
        )
    return y.view(x.shape)
