"""Short causal depthwise conv1d over a varlen batch, with per-sequence conv windows kept in a slot pool.

x is [T, C] (channels last, the step's tokens end to end); weight is [C, K]; conv_states is the layer's pool
tensor [S, C, K-1] holding, per slot, the last K-1 pre-conv inputs of the sequence. Sequence b reads its window
from slot state_slots[b] as the left context (zeros for a new sequence: slots are zeroed when handed out) and
writes its newest K-1 inputs back; snapshots requested in the batch get the window at their offset. The output is
SiLU(conv), [T, C], in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextserve.forward_batch import ForwardBatch

try:  # Triton fast path; absent on CPU-only installs.
    from nextserve.ops import conv1d_triton
except ImportError:
    conv1d_triton = None


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, batch: ForwardBatch
) -> torch.Tensor:
    if x.is_cuda and conv1d_triton is not None:
        return conv1d_triton.causal_conv1d(x, weight, conv_states, batch)
    if batch.is_decode:
        y = _conv1d_decode(x, weight, conv_states, batch.state_slots)
        for b, _, dst in batch.snapshots:  # offset is 1: the window after the step
            conv_states[dst] = conv_states[batch.state_slots[b]]
        return y
    out = torch.empty_like(x)
    k1 = weight.shape[1] - 1
    start = 0
    for b, n in enumerate(batch.query_lens):
        slot = int(batch.state_slots[b])
        # [C, K-1+n]: the saved window, then this step's inputs.
        u = torch.cat([conv_states[slot].to(x.dtype), x[start : start + n].t()], dim=1)
        y = F.conv1d(u.unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), groups=weight.shape[0])[0]  # [C, n]
        out[start : start + n] = F.silu(y).t().to(x.dtype)
        for o, dst in batch.snapshots_of(b):
            conv_states[dst] = u[:, o : o + k1].to(conv_states.dtype)
        conv_states[slot] = u[:, -k1:].to(conv_states.dtype)
        start += n
    return out


def _conv1d_decode(
    x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    window = torch.cat([conv_states[slots].to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window.to(weight.dtype) * weight).sum(-1)
    conv_states[slots] = window[:, :, 1:].to(conv_states.dtype)
    return F.silu(y).to(x.dtype)
