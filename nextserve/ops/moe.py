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
    """sum_k weights[n,k] * expert_{ids[n,k]}(x[n]) for every token.

    bf16/fp16 on CUDA: one grouped GEMM per projection over the (token, expert) pairs sorted by expert, with no
    host synchronisation. Elsewhere (and for the fp32 parity tests): the reference loop over the hit experts.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_grouped_mm"):
        return grouped_experts(x, w13, w2, weights, ids)
    return experts_reference(x, w13, w2, weights, ids)


def grouped_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Grouped-GEMM form: pairs sorted by expert, offsets from a bincount, `torch._grouped_mm` per projection."""
    inter = w2.shape[-1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    token_of = order // ids.shape[1]
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    # w13 [E, 2I, H] viewed as [E, H, 2I] (column-major per expert: what the grouped GEMM wants), w2 likewise.
    h = torch._grouped_mm(x[token_of], w13.transpose(1, 2), offs=offs)  # [N*K, 2I]
    h = F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [N*K, H]
    y = y * weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, y)


def experts_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Torch reference: loops over the experts that received tokens."""
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
