"""RMS norms of Qwen3-Next (spec section 3).

`rms_norm` is the zero-centred RMSNorm: the stored weight w is an offset, the gain is (1 + w), and the multiply
happens in fp32 before the cast back (unlike Llama). `gated_rms_norm` is the Gated DeltaNet output norm: a plain
weight (initialised to ones), normalise first, then gate with SiLU(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # NOTE: mirrors transformers' torch path: the normalised value is cast to the model dtype before x weight.
    y = weight * n.to(dtype)
    return (y * F.silu(z.float())).to(dtype)
