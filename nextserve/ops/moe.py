"""Sparse MoE: router softmax -> top-k -> renormalise, then the routed experts (spec section 8).

Experts are packed: w13 [E, 2I, H] with gate rows first then up rows (transformers' fused layout), w2 [E, H, I].
Legend: N tokens, H hidden, E experts, I expert intermediate size, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextserve.ops import fp8

try:  # Triton kernels (decode and prefill paths); absent on CPU-only installs.
    from nextserve.ops import moe_grouped_triton, moe_triton
except ImportError as e:
    moe_grouped_triton = moe_triton = None
    IMPORT_ERROR: ImportError | None = e
else:
    IMPORT_ERROR = None

# Up to this many tokens the Triton GEMV kernels beat the grouped GEMM's sort-gather-scatter (decode batches; H100
# at Qwen3-Next shapes: 33 vs 93 us at 1 token, 300 vs 420 us at 16, the grouped GEMM ahead from about 48).
SMALL_BATCH_MAX = 32
# Larger batches on CUDA: "triton" (moe_grouped_triton: gather, SiLU-mul and (token, k) order fused into two
# kernels) or "grouped_mm" (torch._grouped_mm on gathered inputs).
LARGE_BATCH_KERNEL = "triton"


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, K] fp32, expert ids [N, K]), best first. (Ties between equal probabilities
    may come out in another order on CUDA, where one Triton kernel does it all.)"""
    if router_logits.is_cuda and moe_triton is not None:
        return moe_triton.route(router_logits, top_k, renormalize)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """sum_k weights[n,k] * expert_{ids[n,k]}(x[n]) for every token.

    On CUDA up to SMALL_BATCH_MAX tokens: Triton GEMV kernels (moe_triton.py). Larger bf16/fp16 batches on CUDA:
    one grouped GEMM per projection over the (token, expert) pairs sorted by expert. Neither syncs with the host.
    Elsewhere (and for the fp32 parity tests): the reference loop over the hit experts.
    Block-FP8 experts (w13_scale, w2_scale, block; see ops/fp8.py): the same two Triton paths with fp8 weights
    where they take the block size, else `fp8.experts_reference`.
    """
    if w13_scale is not None:
        return _fused_experts_fp8(x, w13, w2, weights, ids, w13_scale, w2_scale, block)
    if x.is_cuda and moe_triton is not None and x.shape[0] <= SMALL_BATCH_MAX:
        return moe_triton.fused_experts(x, w13, w2, weights, ids)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        if _grouped_triton(w2):
            return moe_grouped_triton.grouped_experts(x, w13, w2, weights, ids)
        if hasattr(torch, "_grouped_mm"):
            return grouped_experts(x, w13, w2, weights, ids)
    return experts_reference(x, w13, w2, weights, ids)


def _fused_experts_fp8(x, w13, w2, weights, ids, w13_scale, w2_scale, block) -> torch.Tensor:
    if x.is_cuda and moe_triton is not None and moe_triton.fp8_triton.supports(block):
        if x.shape[0] <= SMALL_BATCH_MAX:
            return moe_triton.fused_experts(
                x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, block=block
            )
        if x.dtype in (torch.bfloat16, torch.float16) and _grouped_triton(w2, block):
            return moe_grouped_triton.grouped_experts(
                x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, block=block
            )
    return fp8.experts_reference(x, w13, w13_scale, w2, w2_scale, weights, ids, block)


def _grouped_triton(w2: torch.Tensor, block: tuple[int, int] | None = None) -> bool:
    """Whether larger batches go to the Triton grouped kernels: selected, and their tiles divide the expert sizes
    (block: of the block-FP8 variant)."""
    grouped = moe_grouped_triton
    return LARGE_BATCH_KERNEL == "triton" and grouped is not None and grouped.supports(*w2.shape[1:], block)


def fused_block(
    x: torch.Tensor, w2: torch.Tensor, shared_down: torch.Tensor, block: tuple[int, int] | None = None
) -> bool:
    """Whether `moe_block` serves x. Up to SMALL_BATCH_MAX tokens on CUDA: when the shared expert is as wide as a
    routed one (it rides along as one more slot). Larger batches: bf16/fp16 with the Triton grouped kernels.
    block: the experts (and the shared expert) are block FP8 with this block size."""
    if not x.is_cuda or moe_triton is None:
        return False
    if block is not None and not moe_triton.fp8_triton.supports(block):
        return False
    if x.shape[0] <= SMALL_BATCH_MAX:
        return shared_down.shape[1] == w2.shape[2]
    return x.dtype in (torch.bfloat16, torch.float16) and _grouped_triton(w2, block)


def moe_block(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    renormalize: bool,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The whole sparse MoE block on CUDA (where `fused_block` says so), without host syncs. One GEMM gives the
    router logits and the shared expert's gate logit together (router_weight [E+1+pad, H]: the gate's row at E,
    zero rows after), then the routing kernel. Then, for up to SMALL_BATCH_MAX tokens, two expert GEMV kernels in
    which the shared expert (gate_proj, up_proj, down_proj) is one more slot per token: four launches in all. For
    larger batches, the shared MLP (gate and up GEMMs, SiLU·mul, down GEMM) and the two grouped kernels, whose
    combine also adds the gated shared output: thirteen launches.
    Block FP8 (w13_scale, w2_scale, and shared_scales for the shared expert's three projections, block): the same
    launches with fp8 weights (the shared MLP's GEMMs through `fp8.linear`; the router stays bf16)."""
    if (w13_scale is None) != (shared_scales is None):
        raise ValueError("block-FP8 MoE block: the routed and the shared experts must both be FP8 (or neither)")
    logits = F.linear(x, router_weight)
    weights, ids, gate = moe_triton.route(logits, top_k, renormalize, num_experts=w13.shape[0])
    scales = dict(w13_scale=w13_scale, w2_scale=w2_scale, block=block) if w13_scale is not None else {}
    if x.shape[0] <= SMALL_BATCH_MAX:
        return moe_triton.fused_experts(
            x, w13, w2, weights, ids, shared=(*shared, gate), shared_scales=shared_scales, **scales
        )
    gate_w, up_w, down_w = shared
    if shared_scales is None:
        s = F.linear(moe_triton.silu_mul(F.linear(x, gate_w), F.linear(x, up_w)), down_w)
    else:
        gs, us, ds = shared_scales
        h = moe_triton.silu_mul(fp8.linear(x, gate_w, gs, block), fp8.linear(x, up_w, us, block))
        s = fp8.linear(h, down_w, ds, block)
    return moe_grouped_triton.grouped_experts(x, w13, w2, weights, ids, shared=(s, gate), **scales)


def grouped_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Grouped-GEMM form: pairs sorted by expert, `torch._grouped_mm` per projection, then each token's K outputs
    gathered back and summed. No host synchronisation anywhere (the offsets come from a search on the device), so
    the whole block can be captured in a CUDA graph."""
    N, K = ids.shape
    E, inter = w13.shape[0], w2.shape[-1]
    flat = ids.flatten()
    sorted_ids, order = torch.sort(flat, stable=True)
    # offs[e] = pairs routed to experts 0..e (the end of expert e's rows), as the grouped GEMM wants.
    offs = torch.searchsorted(sorted_ids, torch.arange(E, device=ids.device, dtype=sorted_ids.dtype), right=True)
    offs = offs.to(torch.int32)
    # w13 [E, 2I, H] viewed as [E, H, 2I] (column-major per expert: what the grouped GEMM wants), w2 likewise.
    h = torch._grouped_mm(x[order // K], w13.transpose(1, 2), offs=offs)  # [N*K, 2I]
    fast = moe_triton is not None and x.is_cuda
    h = moe_triton.silu_mul(h) if fast else F.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [N*K, H], sorted by expert
    # Back to (token, k) order with the inverse permutation: a gather and a sum, no atomics.
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=ids.device))
    if fast:
        return moe_triton.combine(y, inverse, weights)
    y = y[inverse].view(N, K, -1)
    return (y * weights[..., None].to(y.dtype)).sum(1, dtype=torch.float32).to(x.dtype)


def experts_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Torch reference: loops over the experts that received tokens."""
    inter = w2.shape[-1]

    def mlp(e: int, tok: torch.Tensor) -> torch.Tensor:
        h = F.linear(x[tok], w13[e])  # [c, 2I]
        return F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])  # [c, H]

    return expert_loop(x, w13.shape[0], weights, ids, mlp)


def expert_loop(x: torch.Tensor, num_experts: int, weights: torch.Tensor, ids: torch.Tensor, mlp) -> torch.Tensor:
    """sum_k weights[n, k] * expert ids[n, k] applied to token n, expert by expert in ascending order over the
    experts that got tokens; `mlp(e, tok) -> [len(tok), H]` is expert e on the tokens at indices `tok` (the
    references, bf16 and FP8, differ only there)."""
    out = torch.zeros_like(x)
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // ids.shape[1]
    w_sorted = weights.flatten()[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok = token_of[start : start + c]
        y = mlp(e, tok)
        # NOTE: weight x output in fp32, cast, then accumulate in the model dtype (transformers' order).
        out.index_add_(0, tok, (y * w_sorted[start : start + c, None].to(y.dtype)).to(x.dtype))
        start += c
    return out
