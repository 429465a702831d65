"""Sparse MoE: router softmax -> top-k -> renormalise, then the routed experts (spec section 8).

Experts are packed: w13 [E, 2I, H] with gate rows first then up rows (transformers' fused layout), w2 [E, H, I].
Legend: N tokens, H hidden, E experts, I expert intermediate size, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, K] fp32, expert ids [N, K]), best first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[n,k] * expert_{ids[n,k]}(x[n]) for every token; torch reference (loops over hit experts)."""
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of = order // ids.shape[1]
    w_sorted = weights.flatten()[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok = token_of[start : start + c]
        h = F.linear(x[tok], w13[e])  # [c, 2I]
        h = F.silu(h[:, :inter]) * h[:, inter:]
        y = F.linear(h, w2[e])  # [c, H]
        # NOTE: weight x output in fp32, cast, then accumulate in the model dtype (transformers' order).
        out.index_add_(0, tok, (y * w_sorted[start : start + c, None].to(y.dtype)).to(x.dtype))
        start += c
    return out
