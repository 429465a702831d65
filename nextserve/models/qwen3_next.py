"""Qwen3-Next (spec/qwen3-next.md), written to read like the spec.

The model runs on one flat varlen batch per step (see ForwardBatch): hidden states are [T, H] with the tokens of
every sequence end to end. Layers read and write their caches in place: each full-attention layer owns views of
its KV pages (`k_cache`, `v_cache`), each Gated DeltaNet layer its slot-pool views (`conv_state`, `ssm_state`);
the engine binds them once, before the first step (`bind_caches`).

Block-FP8 weights (an FP8 checkpoint, `--quantization fp8`): `quant` says per module name (`prefix`) which
linears and routed experts hold float8_e4m3fn weights with their block scales (`layers/quant.py`).

Tensor parallelism: built with (ctx, comm), each layer holds rank ctx.rank's shard (the plan: models/sharding.py)
and talks to the other ranks only through `comm`; cache views are bound at per-rank shapes.

Legend: T tokens in the step, H hidden size, Hq/Hkv attention heads, D head dim, Hk/Hv linear key/value heads,
dk/dv their head dims, r = Hv/Hk, E experts, I expert intermediate size. Sizes named *_local are per TP rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.forward_batch import ForwardBatch
from nextserve.layers.linear import Linear, column_parallel, row_parallel
from nextserve.layers.quant import Fp8Config, fp8_block, fp8_blocks
from nextserve.layers.rotary import RotaryEmbedding, apply_rotary
from nextserve.layers.shard import Split, Take, replicated
from nextserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from nextserve.loader.fp8 import FP8_DTYPE, scale_shape
from nextserve.model_config import ModelConfig
from nextserve.models.sharding import check_tp_size
from nextserve.ops.attention import paged_attention
from nextserve.ops.conv1d import causal_conv1d
from nextserve.ops.gdn import gated_delta_rule, gdn_gates
from nextserve.ops.moe import fused_block, fused_experts, moe_block, route
from nextserve.ops.norm import add_rms_norm, gated_rms_norm, rms_norm
from nextserve.parallel import Communicator, ParallelContext


def _param(*shape: int, dtype: torch.dtype, shard_fn=replicated) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.shard_fn = shard_fn
    return p


class Qwen3NextRMSNorm(nn.Module):
    """Zero-centred RMSNorm: gain (1 + weight)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (norm(residual + x), residual + x): the add and the norm in one launch."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Qwen3NextAttention(nn.Module):
    """Gated full attention: q/gate split per head, q/k norm, partial RoPE, GQA over paged KV, sigmoid gate."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, comm: Communicator, dtype: torch.dtype, quant, prefix):
        super().__init__()
        fp8 = fp8_blocks(quant, prefix)
        D = self.head_dim = cfg.head_dim
        self.num_heads = ctx.split(cfg.num_attention_heads, "num_attention_heads")
        kv = cfg.num_key_value_heads
        # With more ranks than KV heads each rank keeps the one KV head its query heads read (rank r's query heads
        # are r Hq/n.. of Hq, and KV head h serves query heads h Hq/Hkv..: h = r // (n / Hkv)); ranks sharing a
        # head hold the same rows.
        self.num_kv_heads = max(1, kv // ctx.size)
        if ctx.size <= kv:
            kv_shard = Split(ctx, 0, (kv * D,))
        else:
            h = ctx.rank * kv // ctx.size
            kv_shard = Take(0, h * D, (h + 1) * D, kv * D)
        # q_proj rows are [query(D) | gate(D)] per head, so a contiguous row split keeps heads whole.
        H, Hq = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj = column_parallel(ctx, H, Hq * D * 2, dtype=dtype, fp8_block=fp8("q_proj"))
        kv_dim = self.num_kv_heads * D
        self.k_proj = Linear(H, kv_dim, shard_fn=kv_shard, dtype=dtype, fp8_block=fp8("k_proj"))
        self.v_proj = Linear(H, kv_dim, shard_fn=kv_shard, dtype=dtype, fp8_block=fp8("v_proj"))
        self.o_proj = row_parallel(ctx, comm, Hq * D, H, dtype=dtype, fp8_block=fp8("o_proj"))
        self.q_norm = Qwen3NextRMSNorm(D, cfg.rms_norm_eps, dtype)
        self.k_norm = Qwen3NextRMSNorm(D, cfg.rms_norm_eps, dtype)
        self.scale = D**-0.5
        self.k_cache: torch.Tensor | None = None  # [pages, page_size, Hkv, D], bound by the engine
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        q, gate = self.q_proj(x).view(T, self.num_heads, 2 * D).split(D, dim=-1)  # [T, Hq, D] each
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(T, self.num_kv_heads, D)), cos, sin)
        v = self.v_proj(x).view(T, self.num_kv_heads, D)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, batch, self.scale)  # [T, Hq, D]
        return self.o_proj((o * torch.sigmoid(gate)).reshape(T, -1))  # gate is a strided view: no reshape copy


class Qwen3NextGatedDeltaNet(nn.Module):
    """Gated DeltaNet linear attention (spec section 7): interleaved qkvz/ba projections, short causal conv,
    gates, the delta rule over the slot's recurrent state, gated RMSNorm, output projection."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, comm: Communicator, dtype: torch.dtype, quant, prefix):
        super().__init__()
        fp8 = fp8_blocks(quant, prefix)
        self.hk = ctx.split(cfg.linear_num_key_heads, "linear_num_key_heads")
        self.hv = ctx.split(cfg.linear_num_value_heads, "linear_num_value_heads")
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.hv // self.hk
        self.eps = cfg.rms_norm_eps
        H, kd, vd = cfg.hidden_size, cfg.linear_key_dim, cfg.linear_value_dim
        # Rows are grouped by key head ([q|k|v|z] and [b|a] per group), so contiguous row splits keep groups whole.
        self.in_proj_qkvz = column_parallel(ctx, H, 2 * kd + 2 * vd, dtype=dtype, fp8_block=fp8("in_proj_qkvz"))
        self.in_proj_ba = column_parallel(
            ctx, H, 2 * cfg.linear_num_value_heads, dtype=dtype, fp8_block=fp8("in_proj_ba")
        )
        conv = nn.Module()
        # Conv channels are de-interleaved [q (kd) | k (kd) | v (vd)]: each part is split separately.
        conv.weight = _param(
            ctx.split(cfg.linear_conv_dim, "conv channels"),
            1,
            cfg.linear_conv_kernel_dim,
            dtype=dtype,
            shard_fn=Split(ctx, 0, (kd, kd, vd)),
        )
        self.conv1d = conv
        self.A_log = _param(self.hv, dtype=dtype, shard_fn=Split(ctx, 0, (cfg.linear_num_value_heads,)))
        self.dt_bias = _param(self.hv, dtype=dtype, shard_fn=Split(ctx, 0, (cfg.linear_num_value_heads,)))
        norm = nn.Module()
        norm.weight = _param(self.dv, dtype=dtype)
        self.norm = norm
        self.out_proj = row_parallel(ctx, comm, vd, H, dtype=dtype, fp8_block=fp8("out_proj"))
        self.conv_state: torch.Tensor | None = None  # [slots, conv_dim_local, K-1], bound by the engine
        self.ssm_state: torch.Tensor | None = None  # [slots, Hv, dk, dv]
        # Conv channels run in [q | k | v] order, key-head-major then value-head-major; the projection's columns are
        # grouped [q | k | v | z] per key head. conv_columns[c] is the projection column feeding channel c, so the
        # conv reads the projection output in place (no concatenated copy).
        dk, rdv = self.dk, self.r * self.dv
        j = torch.arange(self.hk)[:, None] * (2 * dk + 2 * rdv)  # first column of each key head's group
        cols = [j + torch.arange(dk), j + dk + torch.arange(dk), j + 2 * dk + torch.arange(rdv)]
        self.register_buffer("conv_columns", torch.cat([c.flatten() for c in cols]).int(), persistent=False)
        # The map is contiguous in runs of gcd(dk, r dv) channels starting at multiples of 16 when both sizes are:
        # the CUDA prefill conv then loads runs instead of gathering.
        self.conv_column_run = math.gcd(dk, rdv) if dk % 16 == 0 and rdv % 16 == 0 else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, hk, hv, dk, dv, r = x.shape[0], self.hk, self.hv, self.dk, self.dv, self.r
        qkvz = self.in_proj_qkvz(x)  # [T, Hk * (2 dk + 2 r dv)]
        groups = qkvz.view(T, hk, -1).split([dk, dk, r * dv, r * dv], dim=-1)  # q, k, v, z per key head
        z = groups[3].view(T, hk, r, dv)  # a strided view: the gated norm reads it in place
        parts = [hk * dk, hk * dk, hv * dv]
        w, run = self.conv1d.weight[:, 0, :], self.conv_column_run
        q, k, v = causal_conv1d(qkvz, w, self.conv_state, batch, parts, columns=self.conv_columns, column_run=run)
        q, k, v = q.view(T, hk, dk), k.view(T, hk, dk), v.view(T, hv, dv)
        # beta = sigmoid(b), log decay g = -exp(A_log) softplus(a + dt_bias) <= 0 (fp32), from [b | a] per key head.
        g, beta = gdn_gates(self.in_proj_ba(x).view(T, hk, 2 * r), self.A_log, self.dt_bias)
        o = gated_delta_rule(q, k, v, g, beta, self.ssm_state, batch)  # [T, Hv, dv]
        o = gated_rms_norm(o.view(T, hk, r, dv), z, self.norm.weight, self.eps)
        return self.out_proj(o.reshape(T, hv * dv))


class Qwen3NextMLP(nn.Module):
    """SwiGLU MLP (the shared expert, and dense layers listed in mlp_only_layers)."""

    def __init__(self, H: int, inter: int, ctx: ParallelContext, comm: Communicator | None, dtype, quant, prefix):
        super().__init__()
        fp8 = fp8_blocks(quant, prefix)
        self.gate_proj = column_parallel(ctx, H, inter, dtype=dtype, fp8_block=fp8("gate_proj"))
        self.up_proj = column_parallel(ctx, H, inter, dtype=dtype, fp8_block=fp8("up_proj"))
        self.down_proj = row_parallel(ctx, comm, inter, H, dtype=dtype, fp8_block=fp8("down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3NextExperts(nn.Module):
    """All routed experts, packed: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I].

    Block-FP8 (`block`): both float8_e4m3fn, with block scales gate_up_proj_scale_inv [E, 2 ceil(I/bn), ceil(H/bk)]
    (the gate's block rows, then the up's) and down_proj_scale_inv [E, ceil(H/bn), ceil(I/bk)]."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, block: tuple[int, int] | None):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        i_local = ctx.split(I, "moe_intermediate_size")
        self.block = block
        wdtype = FP8_DTYPE if block else dtype
        self.gate_up_proj = _param(E, 2 * i_local, H, dtype=wdtype, shard_fn=Split(ctx, 1, (I, I)))
        self.down_proj = _param(E, H, i_local, dtype=wdtype, shard_fn=Split(ctx, 2, (I,)))
        # Shapes of one expert's checkpoint tensors, before sharding (the loader checks them).
        self.gate_up_proj.expert_shape = (I, H)
        self.down_proj.expert_shape = (H, I)
        if block:
            # Scales cut where the weights are, in whole blocks (an error here when I / n is not whole blocks).
            gu_shard = self.gate_up_proj.shard_fn.for_blocks(block[0])
            dn_shard = self.down_proj.shard_fn.for_blocks(block[1])
            gu, dn = scale_shape((i_local, H), block), scale_shape((H, i_local), block)
            self.gate_up_proj_scale_inv = _param(E, 2 * gu[0], gu[1], dtype=torch.float32, shard_fn=gu_shard)
            self.down_proj_scale_inv = _param(E, *dn, dtype=torch.float32, shard_fn=dn_shard)
            self.gate_up_proj_scale_inv.fp8_block = self.down_proj_scale_inv.fp8_block = block

    def fp8_args(self) -> dict:
        """The keyword arguments the MoE ops take for block-FP8 experts ({} when the experts are not FP8)."""
        if not self.block:
            return {}
        return dict(w13_scale=self.gate_up_proj_scale_inv, w2_scale=self.down_proj_scale_inv, block=self.block)


class Qwen3NextSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, comm: Communicator, dtype: torch.dtype, quant, prefix):
        super().__init__()
        H = cfg.hidden_size
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        # The router and the shared expert's gate stay in the model dtype (the loader dequantises FP8 ones): the
        # routing reads their logits at full precision, and the fused block concatenates them (_router_weight).
        self.gate = Linear(H, cfg.num_experts, dtype=dtype)
        self.experts = Qwen3NextExperts(cfg, ctx, dtype, fp8_block(quant, f"{prefix}.experts"))
        inter = cfg.shared_expert_intermediate_size
        self.shared_expert = Qwen3NextMLP(H, inter, ctx, None, dtype, quant, f"{prefix}.shared_expert")
        self.shared_expert_gate = Linear(H, 1, dtype=dtype)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        se, w13, w2 = self.shared_expert, self.experts.gate_up_proj, self.experts.down_proj
        fp8 = self.experts.fp8_args()
        # The fused block takes the shared expert in the experts' format (both FP8 or neither).
        same_format = (se.down_proj.fp8_block is not None) == bool(fp8)
        if same_format and fused_block(x, w2, se.down_proj.weight, self.experts.block):
            # CUDA: router, shared gate, routed and shared experts in a few Triton launches (ops/moe.py).
            shared = (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight)
            if fp8:
                fp8["shared_scales"] = self._shared_scales()
            out = moe_block(x, self._router_weight(), w13, w2, shared, self.top_k, self.renormalize, **fp8)
            return self.comm.all_reduce(out)
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        routed = fused_experts(x, w13, w2, weights.to(x.dtype), ids, **fp8)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        # Both halves are partial sums under TP: one all-reduce for the block.
        return self.comm.all_reduce(routed + shared)

    def _router_weight(self) -> torch.Tensor:
        """[E+1+pad, H]: the router's rows, the shared expert gate's row (one GEMM for both), then zero rows up to a
        multiple of 8: with E+1 = 513 output columns cuBLAS falls back to an unaligned kernel, 250 us instead of a
        few at 8K tokens. The routing kernel reads the first E+1 columns. Rebuilt whenever either weight changes
        (loading writes them in place, which bumps their versions)."""
        a, b = self.gate.weight, self.shared_expert_gate.weight
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version)
        if getattr(self, "_router_key", None) != key:
            pad = -(a.shape[0] + 1) % 8
            self._router_cat = torch.cat([a, b, a.new_zeros(pad, a.shape[1])])
            self._router_key = key
        return self._router_cat

    def _shared_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        se = self.shared_expert
        return (se.gate_proj.weight_scale_inv, se.up_proj.weight_scale_inv, se.down_proj.weight_scale_inv)


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool, ctx, comm, dtype: torch.dtype, quant, prefix):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "full_attention":
            self.self_attn = Qwen3NextAttention(cfg, ctx, comm, dtype, quant, f"{prefix}.self_attn")
        else:
            self.linear_attn = Qwen3NextGatedDeltaNet(cfg, ctx, comm, dtype, quant, f"{prefix}.linear_attn")
        if moe:
            self.mlp = Qwen3NextSparseMoeBlock(cfg, ctx, comm, dtype, quant, f"{prefix}.mlp")
        else:
            self.mlp = Qwen3NextMLP(cfg.hidden_size, cfg.intermediate_size, ctx, comm, dtype, quant, f"{prefix}.mlp")
        self.input_layernorm = Qwen3NextRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = Qwen3NextRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, cos, sin, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (this layer's MLP output, the residual stream before it). The stream is
        residual + h; keeping the last addend apart lets each add run inside the next norm's kernel."""
        if residual is None:  # the first layer: h is the embedding
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        if self.layer_type == "full_attention":
            a = self.self_attn(x, cos, sin, batch)
        else:
            a = self.linear_attn(x, batch)
        x, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(x), residual


class Qwen3NextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx, comm, dtype: torch.dtype, quant: Fp8Config | None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, comm, dtype)
        self.layers = nn.ModuleList(
            Qwen3NextDecoderLayer(cfg, t, cfg.is_moe_layer(i), ctx, comm, dtype, quant, f"model.layers.{i}")
            for i, t in enumerate(cfg.layer_types)
        )
        self.norm = Qwen3NextRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(cfg.rope)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[T] ids -> [T, H] final normed hidden states (what feeds lm_head and the MTP head)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(batch.positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, batch)
        return self.norm(h, residual)[0]


class Qwen3NextMTP(nn.Module):
    """Multi-token prediction head (spec section 10): predicts token t+2 from the target's normed hidden state at
    t and the embedding of token t+1, through one full-attention + MoE layer with its own KV cache."""

    def __init__(self, cfg: ModelConfig, ctx, comm, dtype: torch.dtype, quant: Fp8Config | None):
        super().__init__()
        H = cfg.hidden_size
        self.fc = Linear(2 * H, H, dtype=dtype, fp8_block=fp8_block(quant, "mtp.fc"))
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(H, cfg.rms_norm_eps, dtype)
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(H, cfg.rms_norm_eps, dtype)
        layer = Qwen3NextDecoderLayer(cfg, "full_attention", True, ctx, comm, dtype, quant, "mtp.layers.0")
        self.layers = nn.ModuleList([layer])
        self.norm = Qwen3NextRMSNorm(H, cfg.rms_norm_eps, dtype)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos, sin, batch: ForwardBatch) -> torch.Tensor:
        """embeds: embedding of token t+1 [T, H]; hidden: target's normed hidden at t [T, H] -> normed [T, H]."""
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        return self.norm(*self.layers[0](u, None, cos, sin, batch))[0]


class Qwen3NextForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        ctx: ParallelContext | None = None,
        comm: Communicator | None = None,
        with_mtp: bool | None = None,
        quant: Fp8Config | None = None,
    ):
        super().__init__()
        ctx = ctx or ParallelContext()
        comm = comm or Communicator(ctx)
        if comm.ctx != ctx:
            raise ValueError(f"the communicator is for {comm.ctx}, the model for {ctx}")
        check_tp_size(cfg, ctx.size, quant)
        self.config, self.dtype, self.quant, self.ctx = cfg, dtype, quant, ctx
        self.model = Qwen3NextModel(cfg, ctx, comm, dtype, quant)
        # Full-vocabulary logits on every rank (all-gathered).
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, ctx, comm, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if with_mtp is None:
            with_mtp = cfg.num_nextn_predict_layers > 0
        self.mtp = Qwen3NextMTP(cfg, ctx, comm, dtype, quant) if with_mtp else None

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] -> [R, V]: the full vocabulary on every rank (a collective: every rank must call it)."""
        return self.lm_head(hidden)

    def mtp_forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One draft step: input_ids are tokens t+1 (shifted), hidden the normed states at t, positions t."""
        cos, sin = self.model.rotary_emb.cos_sin(batch.positions, hidden.dtype)
        return self.mtp(self.model.embed_tokens(input_ids), hidden, cos, sin, batch)

    # ---- caches ----------------------------------------------------------------------------------------------
    def attention_layers(self) -> list[Qwen3NextAttention]:
        """Full-attention layers in KV-pool order: the main model's, then the MTP layer's."""
        layers = [layer.self_attn for layer in self.model.layers if layer.layer_type == "full_attention"]
        if self.mtp is not None:
            layers.append(self.mtp.layers[0].self_attn)
        return layers

    def linear_attention_layers(self) -> list[Qwen3NextGatedDeltaNet]:
        return [layer.linear_attn for layer in self.model.layers if layer.layer_type == "linear_attention"]
