"""RMS norms of Qwen3-Next (spec section 3).

`rms_norm` is the zero-centred RMSNorm: the stored weight w is an offset, the gain is (1 + w), and the multiply
happens in fp32 before the cast back (unlike Llama). `add_rms_norm` adds a residual first (the sum rounded to x's
dtype, as `residual + x` is) and returns both the norm and the sum, so a decoder layer's residual add and the next
norm are one launch. `gated_rms_norm` is the Gated DeltaNet output norm: a plain weight (initialised to ones),
normalise first, then gate with SiLU(z).

Each function takes rows over the last dim (any leading dims, strided views allowed) and returns x's dtype. On CUDA
they run the Triton kernels of `norm_triton`; elsewhere (or without Triton) the torch references below, which
define the numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton fast path; absent on CPU-only installs.
    from nextserve.ops import norm_triton
except ImportError as e:
    norm_triton, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and norm_triton is not None and norm_triton.supports(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        return norm_triton.rms_norm(x, weight, eps)
    return _rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x (in x's dtype); returns (rms_norm(h, weight, eps), h). x, residual [..., H]."""
    if x.shape != residual.shape or x.dtype != residual.dtype or x.device != residual.device:
        raise ValueError(
            f"add_rms_norm needs x and residual of one shape, dtype and device, got {tuple(x.shape)} {x.dtype} "
            f"{x.device} and {tuple(residual.shape)} {residual.dtype} {residual.device}"
        )
    if _use_triton(x):
        return norm_triton.add_rms_norm(x, residual, weight, eps)
    h = residual + x
    return _rms_norm_ref(h, weight, eps), h


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.shape != z.shape or x.device != z.device:
        raise ValueError(
            f"gated_rms_norm needs x and z of one shape and device, got {tuple(x.shape)} {x.device} "
            f"and {tuple(z.shape)} {z.device}"
        )
    if _use_triton(x):
        return norm_triton.gated_rms_norm(x, z, weight, eps)
    return _gated_rms_norm_ref(x, z, weight, eps)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def _gated_rms_norm_ref(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # NOTE: mirrors transformers' torch path: the normalised value is cast to the model dtype before x weight.
    y = weight * n.to(dtype)
    return (y * F.silu(z.float())).to(dtype)
