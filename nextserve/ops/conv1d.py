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
except ImportError as e:
    conv1d_triton, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None


# Uniform batches (every sequence the same number of new tokens) up to this length take the batched path.
UNIFORM_MAX = 8


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_states: torch.Tensor,
    batch: ForwardBatch,
    parts: list[int] | None = None,
    columns: torch.Tensor | None = None,
    column_run: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """With `parts` (channel counts summing to C): one [T, part] output per part instead of [T, C]. The CUDA
    prefill path writes each part contiguously (what the chunked GDN kernel wants: no copies); elsewhere they are
    views. With `columns` [C] (int): channel c reads x[:, columns[c]] (x may be wider than C), as if
    x[:, columns] were passed, without that copy on CUDA. column_run: a promise that the map is contiguous in
    aligned runs of that many channels, each starting at a column that is a multiple of 16 (the CUDA prefill then
    loads whole runs instead of gathering)."""
    if x.is_cuda and conv1d_triton is not None:
        return conv1d_triton.causal_conv1d(x, weight, conv_states, batch, parts, columns, column_run)
    if columns is not None:
        x = x[:, columns.long()]
    out = _causal_conv1d(x, weight, conv_states, batch)
    return out if parts is None else list(out.split(parts, dim=-1))


def _causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, batch: ForwardBatch
) -> torch.Tensor:
    n = batch.uniform_len
    if n is not None and n <= UNIFORM_MAX:
        return _conv1d_uniform(x, weight, conv_states, batch, n)
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


def _conv1d_uniform(
    x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor, batch: ForwardBatch, n: int
) -> torch.Tensor:
    """Every sequence brings n tokens (decode, speculative verify): all windows at once, [B, C, K-1+n]."""
    B, C = len(batch.query_lens), x.shape[1]
    k1 = weight.shape[1] - 1
    slots = batch.state_slots
    u = torch.cat([conv_states[slots].to(x.dtype), x.view(B, n, C).transpose(1, 2)], dim=-1)
    y = (u.unfold(2, k1 + 1, 1).to(weight.dtype) * weight[:, None, :]).sum(-1)  # [B, C, n]
    for b, offset, dst in batch.snapshots:
        conv_states[dst] = u[b, :, offset : offset + k1].to(conv_states.dtype)
    conv_states[slots] = u[:, :, -k1:].to(conv_states.dtype)
    return F.silu(y).transpose(1, 2).reshape(B * n, C).to(x.dtype)
