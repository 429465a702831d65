"""Causal attention over a paged KV cache (torch reference), GQA, for a varlen batch.

k_cache / v_cache are the layer's page pool [num_pages, page_size, Hkv, D]. The step's new keys and values are
written at batch.slot_mapping first; then sequence b attends over its first cached_lens[b] + query_lens[b] cached
tokens, its new queries at the last query_lens[b] positions (causal).
Legend: T tokens, Hq query heads, Hkv KV heads, D head dim, L context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from nextserve.forward_batch import ForwardBatch

try:  # Triton decode kernel (paged, split-K, capturable in CUDA graphs); absent on CPU-only installs.
    from nextserve.ops import attention_triton
except ImportError as e:
    attention_triton, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None

_QUERY_BLOCK = 1024


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
        if q.is_cuda and attention_triton is not None:
            context_lens = (batch.cached_lens_t + 1).to(torch.int32)  # on the device: no sync, graph-safe
            return attention_triton.paged_decode_attention(q, k_cache, v_cache, batch.page_table, context_lens, scale)
        return _decode_attention(q, k_cache, v_cache, batch, scale)
    ps = batch.page_size
    out = torch.empty_like(q)
    start = 0
    for b, (n, c) in enumerate(zip(batch.query_lens, batch.cached_lens)):
        L = c + n
        qb = q[start : start + n].transpose(0, 1)[None]  # [1, Hq, n, D]: 4-D, or SDPA falls back to its math path
        if c == 0:
            # A fresh prompt: its keys are this step's; plain causal attention (flash / cuDNN on GPUs).
            kb, vb = (x[start : start + n].transpose(0, 1)[None] for x in (k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # After a cached prefix, query i (absolute position c + i) sees keys 0 .. c + i: causal aligned to the
            # bottom right. Query blocks bound what a backend without that mask (CPU) materialises.
            pages = batch.page_table[b, : (L + ps - 1) // ps].long()
            kb, vb = (x[pages].flatten(0, 1)[:L].to(q.dtype).transpose(0, 1)[None] for x in (k_cache, v_cache))
            o = torch.empty_like(qb)
            for lo in range(0, n, _QUERY_BLOCK):
                hi = min(n, lo + _QUERY_BLOCK)
                o[:, :, lo:hi] = F.scaled_dot_product_attention(
                    qb[:, :, lo:hi],
                    kb[:, :, : c + hi],
                    vb[:, :, : c + hi],
                    attn_mask=causal_lower_right(hi - lo, c + hi),
                    scale=scale,
                    enable_gqa=True,
                )
        out[start : start + n] = o[0].transpose(0, 1)
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
    mask = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, Hq, 1, D]
        kb.transpose(1, 2),  # [B, Hkv, L, D]: GQA without materialising the repeated heads
        vb.transpose(1, 2),
        enable_gqa=True,
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return o[:, :, 0, :]
