"""Block-wise FP8 (e4m3fn) weight quantisation, as used by Hugging Face "fp8" checkpoints.

A weight W [out, in] is cut into blocks of bs0 rows x bs1 columns (the last row/column of blocks may be
partial) and stored as Wq (float8_e4m3fn, same shape) plus S = ``weight_scale_inv`` (fp32,
[ceil(out/bs0), ceil(in/bs1)]):

    W[i, j] = float(Wq[i, j]) * S[i // bs0, j // bs1]

Despite its name, ``scale_inv`` multiplies on dequantisation. Both functions are vectorised over blocks and
run on whatever device their inputs live on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def scale_shape(weight_shape: tuple[int, int] | torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` tensor for a 2-D weight of ``weight_shape`` cut into ``block``s."""
    out_features, in_features = weight_shape
    bs0, bs1 = block
    return (-(-out_features // bs0), -(-in_features // bs1))


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    """Return ``block`` as a tuple of two positive ints, or raise ValueError."""
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(f"FP8 block size must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def _to_blocks(w: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a 2-D tensor to whole blocks and view it as [ob, bs0, ib, bs1]."""
    (ob, ib), (bs0, bs1) = grid, block
    out_features, in_features = w.shape
    # F.pad's tuple runs from the last dimension: (left, right) of dim 1, then (top, bottom) of dim 0.
    w = F.pad(w, (0, ib * bs1 - in_features, 0, ob * bs0 - out_features))
    return w.view(ob, bs0, ib, bs1)


def dequantize_block_fp8(
    wq: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Return ``wq * scale_inv`` broadcast over ``block``s, as a contiguous tensor of ``dtype``.

    ``wq`` is [out, in] float8_e4m3fn; ``scale_inv`` is [ceil(out/bs0), ceil(in/bs1)]. The product is taken in
    fp32 and rounded to ``dtype`` once.
    """
    block = check_block(block)
    if wq.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(wq.shape)}")
    expected = scale_shape(wq.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(wq.shape)} "
            f"with block {block}: expected {expected}"
        )
    out_features, in_features = wq.shape
    blocks = _to_blocks(wq.to(torch.float32), expected, block)  # [ob, bs0, ib, bs1]
    blocks = blocks * scale_inv.to(device=wq.device, dtype=torch.float32)[:, None, :, None]
    w = blocks.view(expected[0] * block[0], expected[1] * block[1])[:out_features, :in_features]
    # NOTE: .to() is a no-op for dtype=float32, so the padded view would leak out without .contiguous().
    return w.to(dtype).contiguous()


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D floating tensor to (Wq float8_e4m3fn [out, in], scale_inv fp32 [ob, ib]).

    Each block's scale is amax / 448, so the block's largest magnitude lands on e4m3's largest finite value.
    An all-zero block gets scale 1 (any positive value would do) so that nothing divides by zero.
    """
    block = check_block(block)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"can only quantise a 2-D floating tensor, got {w.dtype} of shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a tensor holding inf or NaN")
    out_features, in_features = w.shape
    grid = scale_shape(w.shape, block)
    blocks = _to_blocks(w.to(torch.float32), grid, block)  # [ob, bs0, ib, bs1]; padding is zeros
    amax = blocks.abs().amax(dim=(1, 3))  # [ob, ib]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # The clamp guards against fp32 rounding pushing the block maximum a hair past 448.
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(grid[0] * block[0], grid[1] * block[1])[:out_features, :in_features]
    return q.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()
