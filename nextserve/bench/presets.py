"""Model geometries for benchmarks, by name, and random weights with realistic scales (no checkpoint on disk).

`preset_config(name, num_layers)` returns the ModelConfig of a named geometry, optionally cut to its first
`num_layers` layers (a multiple of the full-attention interval, so the 3 GDN : 1 attention pattern is kept: 12
layers of the 80B are 9 GDN + 3 attention). `param_counts(cfg)` counts every part's parameters from the config alone,
and `weight_bytes(cfg, dtype, quant)` reads the bytes each part is stored in (bf16, or block-FP8 with its scales) off a
build on the meta device, so the weights' size is known before anything is allocated (`check_weights_fit`). The
roofline's cost model lives here too: `decode_bytes` (bytes one decode step must move) and `prefill_flops` (FLOPs
of one prefill, with the share that runs at the FP8 rate).
Tensor parallelism: `tp_size` (default 1) gives the same figures for one rank of a TP-`tp_size` model (its shard of
every part, read off a meta build of rank 0's model; the KV heads and state of one rank), what each GPU reads and
computes when the model is split over GPUs.
`init_random_weights(model)` fills a built model (bf16 or block-FP8) in place with random weights of realistic
scales: it is `loader/dummy.py`'s `init_dummy_weights`, the one `--load-format dummy` uses, where the scales are
listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nextserve.engine.kv_pool import KVLayout
from nextserve.engine.state_pool import StateLayout
from nextserve.layers.quant import Fp8Config
from nextserve.loader.dummy import init_dummy_weights
from nextserve.loader.fp8 import FP8_DTYPE
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextExperts, Qwen3NextForCausalLM
from nextserve.parallel import Communicator, ParallelContext

GiB = 2**30

# Same function under the name the benchmarks import (bench model's figures come from the same weights).
init_random_weights = init_dummy_weights

PRESETS: dict[str, dict] = {
    # spec section 1
    "qwen3-next-80b-a3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=48,
        full_attention_interval=4,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        intermediate_size=5120,
        norm_topk_prob=True,
        rope_theta=10_000_000.0,
        partial_rotary_factor=0.25,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        tie_word_embeddings=False,
    ),
    # Same shape of model, small enough for CPU tests (3 GDN + 1 attention layer).
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        intermediate_size=128,
        norm_topk_prob=True,
        rope_theta=10_000.0,
        partial_rotary_factor=0.25,
        rms_norm_eps=1e-6,
        max_position_embeddings=65536,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    """The named geometry, cut to its first `num_layers` layers (None: all of them)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    d = dict(PRESETS[name])
    if num_layers is not None:
        full, interval = d["num_hidden_layers"], d["full_attention_interval"]
        if not 0 < num_layers <= full or num_layers % interval:
            raise ValueError(
                f"--num-layers {num_layers}: {name} takes a multiple of {interval} layers from {interval} to {full} "
                f"(keeps {interval - 1} GDN layers per attention layer)"
            )
        d["num_hidden_layers"] = num_layers
    return ModelConfig.from_dict(d)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one geometry by part (single rank, no MTP head)."""

    embed: int  # embed_tokens
    lm_head: int  # 0 when tied to the embedding
    dense: int  # everything else except the routed experts: attention, GDN, norms, routers, shared experts
    expert: int  # one routed expert of one layer (gate, up and down projections)
    num_experts: int  # routed experts per MoE layer
    num_moe_layers: int

    @property
    def routed(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert

    @property
    def total(self) -> int:
        return self.embed + self.lm_head + self.dense + self.routed


def param_counts(cfg: ModelConfig, tp_size: int = 1) -> ParamCounts:
    """Counts what Qwen3NextForCausalLM(cfg, with_mtp=False) allocates, from the config alone (with `tp_size` > 1:
    what rank 0 of that many allocates, counted off a meta build)."""
    if tp_size > 1:
        return _meta_parts(cfg, torch.bfloat16, None, tp_size)[0]
    H, D = cfg.hidden_size, cfg.head_dim
    attention = (
        H * cfg.num_attention_heads * D * 2  # q_proj: query and gate rows per head
        + 2 * H * cfg.num_key_value_heads * D  # k_proj, v_proj
        + cfg.num_attention_heads * D * H  # o_proj
        + 2 * D  # q_norm, k_norm
    )
    kd, vd, hv = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
    gdn = (
        H * (2 * kd + 2 * vd)  # in_proj_qkvz
        + H * 2 * hv  # in_proj_ba
        + cfg.linear_conv_dim * cfg.linear_conv_kernel_dim  # conv1d
        + 2 * hv  # A_log, dt_bias
        + cfg.linear_value_head_dim  # gated norm
        + vd * H  # out_proj
    )
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    moe_dense = E * H + 3 * H * cfg.shared_expert_intermediate_size + H  # router, shared expert, its gate
    dense = H  # final norm
    num_moe = 0
    for i, kind in enumerate(cfg.layer_types):
        dense += 2 * H + (attention if kind == "full_attention" else gdn)  # two RMSNorms + the mixer
        if cfg.is_moe_layer(i):
            dense += moe_dense
            num_moe += 1
        else:
            dense += 3 * H * cfg.intermediate_size
    vocab = cfg.vocab_size * H
    return ParamCounts(
        embed=vocab,
        lm_head=0 if cfg.tie_word_embeddings else vocab,
        dense=dense,
        expert=3 * I * H,
        num_experts=E,
        num_moe_layers=num_moe,
    )


@dataclass(frozen=True)
class WeightBytes(ParamCounts):
    """ParamCounts' parts in bytes as the model stores them (single rank, no MTP head): FP8 weights 1 byte per
    parameter plus their fp32 block scales (`expert` includes its share of the packed scales), every other
    parameter in the model dtype. `*_fp8` count the parameters of FP8 weights in that part (their matmuls run at
    the FP8 rate)."""

    dense_fp8: int = 0
    expert_fp8: int = 0


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, quant: Fp8Config | None = None, tp_size: int = 1) -> WeightBytes:
    """Reads the parts' bytes off a build of Qwen3NextForCausalLM(cfg, with_mtp=False) on the meta device (no
    storage; a few tens of ms for all 48 layers of the 80B); with `tp_size` > 1, rank 0's shard."""
    return _meta_parts(cfg, dtype, quant, tp_size)[1]


def _meta_parts(
    cfg: ModelConfig, dtype: torch.dtype, quant: Fp8Config | None, tp_size: int
) -> tuple[ParamCounts, WeightBytes]:
    """Parameters and bytes by part of rank 0 of `tp_size` (TP1: the whole model), off a meta build."""
    # NOTE: read from the model, not counted from the config as param_counts does: which modules are FP8 (the rule
    # in layers/quant.py, or a checkpoint's own list) and the scales' shapes (partial blocks, the experts' packed
    # gate|up scales) live in the model, and a second copy of those rules here would drift from it.
    ctx = ParallelContext(0, tp_size)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg, dtype=dtype, with_mtp=False, quant=quant, ctx=ctx, comm=Communicator(ctx))
    size = dict.fromkeys(("embed", "lm_head", "dense", "routed"), 0)
    fp8, numel = dict.fromkeys(size, 0), dict.fromkeys(size, 0)
    for name, p in model.named_parameters():  # a tied lm_head is the embedding's tensor: listed once, as embed
        part = "dense"
        if name.startswith("model.embed_tokens."):
            part = "embed"
        elif name.startswith("lm_head."):
            part = "lm_head"
        elif ".mlp.experts." in name:
            part = "routed"
        size[part] += p.numel() * p.element_size()
        fp8[part] += p.numel() if p.dtype == FP8_DTYPE else 0
        numel[part] += p.numel()
    num_moe = sum(isinstance(m, Qwen3NextExperts) for m in model.modules())
    per_layer = num_moe * cfg.num_experts

    def per_expert(total: int) -> int:
        return total // per_layer if per_layer else 0

    counts = ParamCounts(
        embed=numel["embed"],
        lm_head=numel["lm_head"],
        dense=numel["dense"],
        expert=per_expert(numel["routed"]),
        num_experts=cfg.num_experts,
        num_moe_layers=num_moe,
    )
    return counts, WeightBytes(
        embed=size["embed"],
        lm_head=size["lm_head"],
        dense=size["dense"],
        expert=per_expert(size["routed"]),
        num_experts=cfg.num_experts,
        num_moe_layers=num_moe,
        dense_fp8=fp8["dense"],
        expert_fp8=per_expert(fp8["routed"]),
    )


# ---- cost model: bytes and FLOPs ----------------------------------------------------------------------------------
def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens touch in one MoE layer when each picks k of E uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def kv_layout(cfg: ModelConfig, page_size: int, dtype: torch.dtype, tp_size: int = 1) -> KVLayout:
    """One rank's KV pages: its KV heads (one, replicated, past num_key_value_heads ranks)."""
    heads = max(1, cfg.num_key_value_heads // tp_size)
    return KVLayout(len(cfg.full_attention_layers), page_size, heads, cfg.head_dim, dtype)


def state_layout(cfg: ModelConfig, dtype: torch.dtype, ssm_dtype: torch.dtype, tp_size: int = 1) -> StateLayout:
    """One rank's state slots: its conv channels and value heads."""
    return StateLayout(
        len(cfg.linear_attention_layers),
        cfg.linear_conv_dim // tp_size,
        cfg.linear_conv_kernel_dim,
        cfg.linear_num_value_heads // tp_size,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
        dtype,
        ssm_dtype,
    )


def decode_bytes(
    cfg: ModelConfig,
    dtype: torch.dtype,
    ssm_dtype: torch.dtype,
    batch: int,
    context: int,
    quant: Fp8Config | None = None,
    tp_size: int = 1,
) -> dict[str, float]:
    """Bytes one decode step must move: the weights it touches as stored (all but the routed experts, the experts
    the batch hits, lm_head, B embedding rows; FP8 ones with their scales), the KV of B x C cached tokens, and every
    state slot read and written. With `tp_size` > 1: what one rank moves (its shards; B / tp_size embedding rows
    on average, each row living on one rank)."""
    w = weight_bytes(cfg, dtype, quant, tp_size)
    experts = w.num_moe_layers * expected_experts(w.num_experts, cfg.num_experts_per_tok, batch) * w.expert
    weights = w.dense + w.lm_head + experts + batch * w.embed / cfg.vocab_size
    kv_per_token = kv_layout(cfg, 1, dtype, tp_size).page_bytes
    kv = batch * context * kv_per_token
    state = 2 * batch * state_layout(cfg, dtype, ssm_dtype, tp_size).slot_bytes
    return {"weights": weights, "kv": kv, "state": state, "total": weights + kv + state}


def prefill_flops(
    cfg: ModelConfig, length: int, chunk: int, quant: Fp8Config | None = None, tp_size: int = 1
) -> dict[str, float]:
    """FLOPs of prefilling one sequence: 2 x active parameters per token (k routed experts + the shared one), the
    causal attention (4 x keys x Hq x D per token per attention layer; token p sees p + 1 keys), and lm_head at
    the last token of each chunk. `weights_fp8` is the part of `weights` whose weights are FP8 (with `quant`).
    With `tp_size` > 1: one rank's FLOPs (its shards, Hq / tp_size heads, V / tp_size logits)."""
    n = param_counts(cfg, tp_size)
    per_token = n.dense + n.num_moe_layers * cfg.num_experts_per_tok * n.expert
    weights = 2 * per_token * length
    weights_fp8 = 0
    if quant is not None:
        w = weight_bytes(cfg, torch.bfloat16, quant, tp_size)  # the dtype does not change which weights are FP8
        weights_fp8 = 2 * (w.dense_fp8 + w.num_moe_layers * cfg.num_experts_per_tok * w.expert_fp8) * length
    keys = length * (length + 1) // 2  # sum over tokens of the keys each one attends to
    heads, vocab = cfg.num_attention_heads // tp_size, cfg.vocab_size // tp_size
    attention = len(cfg.full_attention_layers) * 4 * keys * heads * cfg.head_dim
    lm_head = 2 * cfg.hidden_size * vocab * math.ceil(length / chunk)
    total = weights + attention + lm_head
    return {"weights": weights, "weights_fp8": weights_fp8, "attention": attention, "lm_head": lm_head, "total": total}


def check_weights_fit(
    cfg: ModelConfig,
    dtype: torch.dtype,
    free_bytes: int | None,
    preset: str = "",
    quant: Fp8Config | None = None,
    tp_size: int = 1,
) -> int:
    """The weights' bytes as stored (FP8 ones with their scales; one rank's with `tp_size` > 1), before anything
    is allocated; ValueError when they exceed `free_bytes` (None: unchecked)."""
    need = weight_bytes(cfg, dtype, quant, tp_size).total
    if free_bytes is not None and need > free_bytes:
        what = "block-FP8" if quant is not None else str(dtype).removeprefix("torch.")
        what += f" per rank (tensor parallel {tp_size})" if tp_size > 1 else ""
        raise ValueError(
            f"{preset or 'the model'} with {cfg.num_hidden_layers} layers needs {need / GiB:.1f} GiB of weights in "
            f"{what}, but the device has {free_bytes / GiB:.1f} GiB free; take fewer layers with --num-layers"
        )
    return need
