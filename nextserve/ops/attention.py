"""Causal attention over a paged KV cache (torch reference), GQA, for a varlen batch.

k_cache / v_cache are the layer's page pool [num_pages, page_size, Hkv, D]. The step's new keys and values are
written at batch.slot_mapping first; then sequence b attends over its first cached_lens[b] + query_lens[b] cached
tokens, its new queries at the last query_lens[b] positions (causal).
Legend: T tokens, Hq query heads, Hkv KV heads, D head dim, L context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextserve.forward_batch import ForwardBatch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch):
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (new tokens) -> [T, Hq, D]."""
    write_kv(k, v, k_cache, v_cache, batch)
    if batch.is_decode:
        return _decode_attention(q, k_cache, v_cache, batch, scale)
    ps = batch.page_size
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for b, (n, c) in enumerate(zip(batch.query_lens, batch.cached_lens)):
        L = c + n
        pages = batch.page_table[b, : (L + ps - 1) // ps].long()
        kb = k_cache[pages].flatten(0, 1)[:L].to(q.dtype)  # [L, Hkv, D]
        vb = v_cache[pages].flatten(0, 1)[:L].to(q.dtype)
        qb = q[start : start + n]
        # query i (absolute position c + i) sees keys 0 .. c + i
        mask = torch.arange(L, device=q.device)[None, :] <= (c + torch.arange(n, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(
            qb.transpose(0, 1),  # [Hq, n, D]
            kb.repeat_interleave(group, dim=1).transpose(0, 1),
            vb.repeat_interleave(group, dim=1).transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


def _decode_attention(q, k_cache, v_cache, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """One query per sequence, all sequences at once: gather each sequence's pages into [B, L_max] and mask."""
    ps = batch.page_size
    lens = batch.cached_lens_t.long() + 1  # [B] context incl. the new token
    max_len = max(batch.context_lens)
    pages = batch.page_table[:, : (max_len + ps - 1) // ps].long()  # [B, P]
    kb = k_cache[pages].flatten(1, 2)[:, :max_len].to(q.dtype)  # [B, L, Hkv, D]
    vb = v_cache[pages].flatten(1, 2)[:, :max_len].to(q.dtype)
    group = q.shape[1] // k_cache.shape[2]
    mask = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, Hq, 1, D]
        kb.repeat_interleave(group, dim=2).transpose(1, 2),  # [B, Hq, L, D]
        vb.repeat_interleave(group, dim=2).transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return o[:, :, 0, :]
