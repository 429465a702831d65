"""Triton decode attention over a paged KV cache (flash-decoding, split-K), GQA: the CUDA path of
`nextserve.ops.attention` for steps where every sequence brings one new token.

Contract: q [B, Hq, D]; k_cache / v_cache are the layer's page pool [num_pages, page_size, Hkv, D] (same dtype as q,
the new token already written); sequence b attends over its first context_lens[b] (>= 1) cached tokens, whose pages
are page_table[b, 0 .. ceil(context_lens[b] / page_size) - 1] in order (entries after those are never read, so they
may hold anything). Query head h reads KV head h // (Hq / Hkv). Returns [B, Hq, D] in q's dtype; arithmetic is fp32.

Two launches. The first has one program per (sequence, KV head, split): it loads that KV head's group of query heads
as one [BLOCK_G, D] tile (so the scores are a tensor-core dot even for a handful of heads), walks its split's share
of the sequence in blocks of BLOCK_N tokens, looking each token's page up in the page table (no gather copies), and
keeps an online softmax. The second merges the splits' partial outputs by their log-sum-exp. With one split the
first launch writes the output itself. Every bound that depends on a length is read from context_lens inside the
kernels and the grid depends on host ints only, so a launch works for any lengths and can be captured in a CUDA
graph and replayed after the page table and lengths change in place.

Legend: B sequences, Hq / Hkv query / KV heads, G query heads per KV head, D head dim, S splits, W page-table width.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Tokens per block, warps and pipeline stages of the split kernel. Decode attention is bound by reading K and V,
# so what matters is bytes in flight per SM. At D=256, bf16, G=8 on sm_90, 64/4/2 compiles to 168 registers and
# 75 KiB of shared memory (K and V tiles are copied asynchronously, one block ahead): three programs per SM.
# 32/4/3 (119 registers, 42 KiB) fits four. Untimed so far: `python tests/ops/test_gpu_attention.py` sweeps them.
BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 4, 2
# Default split count: aim for about this many programs per SM, and never more than MAX_SPLITS splits (the merge
# reads S partials per head, and splits of very few blocks stop paying for themselves).
PROGRAMS_PER_SM, MAX_SPLITS = 3, 32
_COMBINE_WARPS = 4

_LOG2E = 1.4426950408889634
# Triton swaps in its interpreter at decoration time when this is set; CPU tensors then run the kernels too.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], caches [num_pages, page_size, Hkv, D], page_table [B, W] int, context_lens [B] int -> [B, Hq, D].

    num_splits=None picks `default_num_splits` for this device. CPU tensors run the torch reference (or the kernels,
    under TRITON_INTERPRET=1).
    """
    B, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    _check(q, k_cache, v_cache, page_table, context_lens)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if not (q.is_cuda or _INTERPRET):
        return _torch_decode(q, k_cache, v_cache, page_table, context_lens, scale)
    splits = num_splits or default_num_splits(B, Hkv, _sm_count(q.device))
    group = Hq // Hkv
    # Kernels index the last dim (and the page table's columns) with unit stride; other strides are passed.
    q = q if q.stride(-1) == 1 else q.contiguous()
    page_table = page_table if page_table.stride(-1) == 1 else page_table.contiguous()
    context_lens = context_lens.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "the page pool's head dim must be unit-stride"

    # fp32 (tiny test models) tiles take twice the shared memory: halve the block so any bf16 config still fits.
    block_n = BLOCK_N if q.element_size() <= 2 else max(16, BLOCK_N // 2)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if splits > 1:
        part_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)  # normalised per split
        part_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)  # log2-sum-exp2 per split
    else:
        part_o = part_lse = out  # unused: the split kernel writes the output directly
    _split_kernel[(B, Hkv, splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        context_lens,
        out,
        part_o,
        part_lse,
        scale * _LOG2E,  # scores go through exp2
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        page_table.stride(0),
        Hq,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot wants every dim >= 16; extra rows are masked
        D=D,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        IEEE=q.dtype == torch.float32,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if splits > 1:
        _combine_kernel[(B, Hq)](
            part_o,
            part_lse,
            context_lens,
            out,
            Hq,
            D=D,
            BLOCK_N=block_n,
            NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
            num_warps=_COMBINE_WARPS,
        )
    return out


def default_num_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) so the split kernel fills the GPU, from host ints only (graph-safe).

    With B * Hkv programs already covering every SM, one split (no merge launch). Otherwise enough splits for about
    PROGRAMS_PER_SM programs per SM, at most MAX_SPLITS. Lengths are not known here: a short sequence leaves its
    later splits empty, and those return at once.
    """
    programs = batch_size * num_kv_heads
    if programs >= num_sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-PROGRAMS_PER_SM * num_sms // max(programs, 1))))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on CPU: behave like an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(q, k_cache, v_cache, page_table, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q [B, Hq, D] and caches [pages, page_size, Hkv, D], got {q.shape}, {k_cache.shape}")
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"head dim of q ({D}) and of the cache ({k_cache.shape[3]}) differ")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"want page_table [B, W] and context_lens [B] for B={B}")


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: fp32 inputs at full precision, to match the torch reference (TF32 would
    cost ~1e-3). UPCAST: in fp32, for Triton's interpreter, which multiplies bf16 tiles as their raw uint16 bits."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE or UPCAST:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pt_ptr,
    lens_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_pt,
    Hq,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # This split's blocks: an equal share of the sequence's blocks, the last splits possibly empty.
    ctx = tl.load(lens_ptr + b)
    num_blocks = tl.cdiv(ctx, BLOCK_N)
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_blocks)
    if lo >= hi:  # the merge skips this split too (it computes the same bounds)
        return

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g  # the query heads that read this KV head
    mg = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=mg[:, None], other=0.0)
    pt_row = pt_ptr + b.to(tl.int64) * stride_pt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for blk in range(lo, hi):
        t = blk * BLOCK_N + tl.arange(0, BLOCK_N)  # token positions in the sequence
        mt = t < ctx
        # NOTE: masked loads keep page-table entries past the length (garbage) and cache slots past it (stale,
        # maybe NaN) out of the sums: a zero weight times a NaN value would still be NaN.
        page = tl.load(pt_row + t // PAGE_SIZE, mask=mt, other=0).to(tl.int64)
        off = (t % PAGE_SIZE).to(tl.int64)
        k = tl.load(
            k_head + page[:, None] * stride_kp + off[:, None] * stride_ks + d[None, :], mask=mt[:, None], other=0.0
        )
        s = _dot(q, tl.trans(k), IEEE, UPCAST)
        s = tl.where(mt[None, :], s * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one live token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + page[:, None] * stride_vp + off[:, None] * stride_vs + d[None, :], mask=mt[:, None], other=0.0
        )
        pv = _dot(p.to(v.dtype), v, IEEE, UPCAST)  # bf16/fp16: probabilities rounded for the tensor cores
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / l_i[:, None]
    if NUM_SPLITS == 1:
        p_out = out_ptr + (b * Hq + heads[:, None]) * D + d[None, :]
        tl.store(p_out, o.to(out_ptr.dtype.element_ty), mask=mg[:, None])
    else:
        row = (b * Hq + heads) * NUM_SPLITS + split  # [BLOCK_G] rows of part_lse / part_o
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], o, mask=mg[:, None])
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=mg)


@triton.jit
def _combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    lens_ptr,
    out_ptr,
    Hq,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One program: one (sequence, query head). out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse).
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    num_blocks = tl.cdiv(ctx, BLOCK_N)
    per_split = tl.maximum(tl.cdiv(num_blocks, NUM_SPLITS), 1)
    live = tl.cdiv(num_blocks, per_split)  # splits the split kernel wrote; the rest of the buffer is stale
    s = tl.arange(0, BLOCK_S)
    ms = s < live
    d = tl.arange(0, D)
    row = (b * Hq + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + row, mask=ms, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # 0 for dead splits
    o = tl.load(part_o_ptr + row[:, None] * D + d[None, :], mask=ms[:, None], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + (b * Hq + h) * D + d, res.to(out_ptr.dtype.element_ty))


def _torch_decode(q, k_cache, v_cache, page_table, context_lens, scale: float) -> torch.Tensor:
    """Torch version of the same contract for CPU tensors: gathers the whole page-table width (no host syncs)."""
    B, Hq, D = q.shape
    num_pages, ps, Hkv, _ = k_cache.shape
    W = page_table.shape[1]
    pages = page_table.long().clamp(0, num_pages - 1)  # entries past a length may be anything
    live = torch.arange(W * ps, device=q.device)[None, :] < context_lens.long()[:, None]  # [B, W*ps]
    kb = k_cache[pages].flatten(1, 2).float()  # [B, W*ps, Hkv, D]
    vb = torch.where(live[:, :, None, None], v_cache[pages].flatten(1, 2).float(), 0.0)  # stale slots may be NaN
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bthd->bhgt", qg, kb) * scale
    scores = scores.masked_fill(~live[:, None, None, :], -math.inf)
    o = torch.einsum("bhgt,bthd->bhgd", scores.softmax(-1), vb)
    return o.reshape(B, Hq, D).to(q.dtype)
