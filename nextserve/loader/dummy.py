"""Random weights with realistic scales for a built Qwen3NextForCausalLM (`--load-format dummy`, `bench model`).

`init_dummy_weights(model, seed)` fills every parameter in place, on its device, with nothing read from disk and no
copy of a large tensor on the host. What makes timings representative is the scale of the values, not the values:

  linears, experts, conv     N(0, 1/sqrt(fan_in)): activations keep unit scale through the layers
  router (mlp.gate)          N(0, router_logit_std/sqrt(H)): logits of unit-RMS inputs get that std, so softmax
                             over 512 experts puts a trained-router-like share (about half) on the top 10 and
                             tokens spread over all experts
  embed_tokens               N(0, 1)
  zero-centred RMSNorms      N(0, 0.02) around 0 (gain 1 + w)
  gated norm (GDN)           N(1, 0.02)
  A_log, dt_bias             transformers' initialisation: log U(0.01, 16) and 1

Block-FP8 weights (float8_e4m3fn, with an `X_scale_inv` sibling) are drawn by the same fan-in rule in the model's
dtype and block-quantised into the weight and its scales together; a scale is never drawn on its own. Routed
experts are drawn a chunk of experts at a time (`CHUNK_BYTES` of model-dtype values), and a gate_up's gate and up
halves are quantised apart, as the packed scales expect. Parameters are visited in `named_parameters()` order with
one generator, so a bf16 model gets the same weights for the same seed whatever else changes here.

Tensor parallelism: rank r's model draws every parameter at its full (TP1) shape with the same generator and
keeps its shard (the parameter's `shard_fn`), so the TP-N dummy model is exactly the TP1 one, sharded, and
replicated parameters agree across ranks. The full tensors are transient, one parameter (or chunk of experts) at
a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nextserve.loader.fp8 import FP8_DTYPE, quantize_block_fp8

SCALE = "_scale_inv"
# Model-dtype values of one chunk of experts drawn before quantisation; the quantiser's fp32 temporaries take
# about 8x this, so the peak stays near 1 GiB even when the FP8 weights fill the GPU.
CHUNK_BYTES = 128 * 2**20


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, router_logit_std: float = 2.0) -> None:
    """Fills every parameter of a built Qwen3NextForCausalLM in place, on its device, in its dtype."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = model.config.hidden_size
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(SCALE):
            continue  # written together with its FP8 weight
        if p.dtype == FP8_DTYPE:
            _init_fp8(p, params[name + SCALE], model.dtype, g, gate_up=name.endswith("gate_up_proj"))
            continue
        shard = getattr(p, "shard_fn", None)
        full = shard.full_shape(p.shape) if shard is not None else tuple(p.shape)
        # At TP1 (or for a replicated parameter) draw in place; else draw the full tensor and keep the shard.
        w = p if full == tuple(p.shape) else torch.empty(full, dtype=p.dtype, device=device)
        if name.endswith("A_log"):
            # Drawn in fp32 then cast: log U(0.01, 16), as transformers initialises it.
            w.copy_(torch.empty(full, device=device).uniform_(0.01, 16, generator=g).log_())
        elif name.endswith("dt_bias"):
            w.fill_(1.0)
        elif name.endswith("linear_attn.norm.weight"):
            w.normal_(1.0, 0.02, generator=g)
        elif "norm" in name:
            w.normal_(0.0, 0.02, generator=g)
        elif name.endswith("mlp.gate.weight"):
            w.normal_(0.0, router_logit_std / math.sqrt(hidden), generator=g)
        elif name.endswith("embed_tokens.weight"):
            w.normal_(0.0, 1.0, generator=g)
        else:
            # Linears [out, in], packed experts [E, out, in], conv [C, 1, K]: the last dim is the fan-in.
            w.normal_(0.0, 1.0 / math.sqrt(full[-1]), generator=g)
        if w is not p:
            p.copy_(shard(w))
    if device.type == "cuda":
        # NOTE: the capacity plan reads free memory; the quantiser's temporaries must not stay reserved.
        torch.cuda.empty_cache()


def _init_fp8(weight: nn.Parameter, scale: nn.Parameter, dtype: torch.dtype, g: torch.Generator, gate_up: bool) -> None:
    """Draw N(0, 1/sqrt(fan_in)) in `dtype` and block-quantise it into `weight` (FP8) and `scale` (fp32).

    weight is a linear's [out, in] or packed experts [E, out, in] (a gate_up's rows: gate, then up). Under tensor
    parallelism the full weight is drawn and quantised, and the rank keeps its shard of both (the shard functions
    cut them in whole blocks)."""
    block = scale.fp8_block
    w_shard, s_shard = weight.shard_fn, scale.shard_fn
    full = w_shard.full_shape(weight.shape)
    std = 1.0 / math.sqrt(full[-1])
    if weight.dim() == 2:
        w = torch.empty(full, dtype=dtype, device=weight.device).normal_(0.0, std, generator=g)
        wq, s = quantize_block_fp8(w, block)
        weight.copy_(w_shard(wq))
        scale.copy_(s_shard(s))
        return
    E, rows, cols = full
    halves = 2 if gate_up else 1
    per_expert = rows * cols * dtype.itemsize
    chunk = max(1, min(E, CHUNK_BYTES // per_expert))
    sharded = full != tuple(weight.shape)
    for e0 in range(0, E, chunk):
        e1 = min(E, e0 + chunk)
        w = torch.empty((e1 - e0, rows, cols), dtype=dtype, device=weight.device).normal_(0.0, std, generator=g)
        if not sharded:
            _quantize_experts(w, block, halves, weight[e0:e1], scale[e0:e1])
            continue
        wq = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
        sq = torch.empty((e1 - e0, *s_shard.full_shape(scale.shape)[1:]), dtype=scale.dtype, device=w.device)
        _quantize_experts(w, block, halves, wq, sq)
        weight[e0:e1].copy_(w_shard(wq))
        scale[e0:e1].copy_(s_shard(sq))


def _quantize_experts(w: torch.Tensor, block: tuple[int, int], halves: int, out: torch.Tensor, out_scale: torch.Tensor):
    """Quantise experts w [n, rows, cols] into out (FP8, same shape) and out_scale [n, halves * ob, ib]: each
    expert's `halves` row halves are blocked apart."""
    n, rows, cols = w.shape
    part = rows // halves  # rows of one half (gate or up), or of the whole expert
    if part % block[0] == 0:
        # Row blocks never straddle two halves or two experts: one 2-D quantisation covers the chunk.
        wq, s = quantize_block_fp8(w.view(n * rows, cols), block)  # [n*rows, cols], [n*rows/bs0, ib]
        out.copy_(wq.view(n, rows, cols))
        out_scale.copy_(s.view(out_scale.shape))
        return
    ob = out_scale.shape[1] // halves  # scale rows of one half
    for i in range(n):
        for h in range(halves):
            wq, s = quantize_block_fp8(w[i, h * part : (h + 1) * part], block)
            out[i, h * part : (h + 1) * part].copy_(wq)
            out_scale[i, h * ob : (h + 1) * ob].copy_(s)
