"""Partial rotary embedding (NeoX rotate-half on the first `rotary_dim` dims of each head), optionally YaRN.

Spec section 6. inv_freq and the attention factor are computed once; cos/sin per step from the positions in fp32,
then cast to the activation dtype (as transformers does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nextserve.model_config import RopeConfig


def rope_inv_freq(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] fp32, attention factor that multiplies cos and sin)."""
    d = rope.rotary_dim
    base = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if rope.yarn_factor is None:
        return base, 1.0
    s = rope.yarn_factor
    L0 = rope.yarn_original_max_position

    def corr(n_rot: float) -> float:
        return d * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = corr(rope.yarn_beta_fast), corr(rope.yarn_beta_slow)
    if rope.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (base / s) * (1 - extrapolate) + base * extrapolate
    factor = rope.yarn_attention_factor
    if factor is None:
        factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, float(factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rotary_dim = rope.rotary_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rotary_dim]."""
        angle = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat([angle, angle], dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; rotates x[..., :rotary_dim] with cos/sin [T, rotary_dim]; the rest passes through."""
    d = cos.shape[-1]
    xr, rest = x[..., :d], x[..., d:]
    x1, x2 = xr[..., : d // 2], xr[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    xr = xr * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([xr, rest], dim=-1)
