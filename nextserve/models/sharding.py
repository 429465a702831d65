"""The tensor-parallel sharding plan of Qwen3-Next, and `check_tp_size`: whether a TP degree fits a config.

What rank r of n holds (Legend as in qwen3_next.py):

  Gated DeltaNet   key-head groups r Hk/n.. : in_proj_qkvz rows (stored [q k v z] per key head) and in_proj_ba rows
                   ([b a] per key head) as contiguous row chunks; conv channels: its chunk of each of the q | k | v
                   sections; A_log, dt_bias: its value heads; out_proj: the matching input columns (row-parallel).
                   Recurrent state [Hv/n, dk, dv] and conv window [conv_dim/n, K-1] per slot: nothing replicated.
  attention        query+gate heads r Hq/n.. (q_proj rows are [q | gate] per head), o_proj row-parallel; KV heads
                   split when n <= Hkv, else the one head its query heads read, replicated over n / Hkv ranks.
  MoE              every expert, intermediate columns r I/n.. (gate and up halves cut apart), down_proj columns;
                   the shared expert likewise; router and shared-expert gate replicated. Routed and shared outputs
                   are summed before the block's one all-reduce.
  embedding,       vocabulary rows r V/n.. ; the embedding all-reduces, the lm_head all-gathers its logits so every
  lm_head          rank has the full [R, V]
  MTP head         fc and norms replicated; its decoder layer sharded as above

Two all-reduces per decoder layer (attention or DeltaNet output, MLP output), plus one for the embedding and one
all-gather for the logits. Block-FP8 scales are cut with their weights in whole blocks; a cut inside a block
(TP8 over 512-wide experts with 128-blocks) is refused.
"""

from __future__ import annotations

from nextserve.layers.quant import Fp8Config
from nextserve.model_config import ModelConfig


def check_tp_size(cfg: ModelConfig, tp_size: int, quant: Fp8Config | None = None) -> None:
    """Raises ValueError naming every size of `cfg` that tensor parallelism of `tp_size` cannot split (cheap: call
    it before loading anything)."""
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    n = tp_size
    problems = []

    def need_divisible(value: int, what: str) -> None:
        if value % n:
            problems.append(f"{what}={value} is not divisible by {n}")

    need_divisible(cfg.num_attention_heads, "num_attention_heads")
    kv = cfg.num_key_value_heads
    if kv % n and n % kv:
        problems.append(f"num_key_value_heads={kv} neither divides nor is divisible by {n}")
    need_divisible(cfg.linear_num_key_heads, "linear_num_key_heads")
    need_divisible(cfg.vocab_size, "vocab_size")
    layers = range(cfg.num_hidden_layers)
    if any(cfg.is_moe_layer(i) for i in layers) or cfg.num_nextn_predict_layers:
        need_divisible(cfg.moe_intermediate_size, "moe_intermediate_size")
        need_divisible(cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size")
    if not all(cfg.is_moe_layer(i) for i in layers):
        need_divisible(cfg.intermediate_size, "intermediate_size")
    if not problems and quant is not None:
        problems += _fp8_problems(cfg, n, quant)
    if problems:
        raise ValueError(f"tensor-parallel size {n} does not fit this model: " + "; ".join(problems))


def _fp8_problems(cfg: ModelConfig, n: int, quant: Fp8Config) -> list[str]:
    """Sharded FP8 weights whose per-rank share is not whole blocks (the first layer of each kind stands for all;
    the layer constructors check every module)."""
    D, kv = cfg.head_dim, cfg.num_key_value_heads
    kv_rows = kv * D // n if n <= kv else D
    first = {t: cfg.layer_types.index(t) for t in ("full_attention", "linear_attention") if t in cfg.layer_types}
    checks = []  # (module, per-rank rows or columns, which block dim)
    if "full_attention" in first:
        a = f"model.layers.{first['full_attention']}.self_attn"
        checks += [
            (f"{a}.q_proj", 2 * cfg.num_attention_heads * D // n, 0),
            (f"{a}.o_proj", cfg.num_attention_heads * D // n, 1),
        ]
        if kv > 1:
            checks += [(f"{a}.k_proj", kv_rows, 0), (f"{a}.v_proj", kv_rows, 0)]
    if "linear_attention" in first:
        g = f"model.layers.{first['linear_attention']}.linear_attn"
        qkvz = 2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim
        checks += [(f"{g}.in_proj_qkvz", qkvz // n, 0), (f"{g}.out_proj", cfg.linear_value_dim // n, 1)]
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if moe:
        m = f"model.layers.{moe[0]}.mlp"
        inter, shared = cfg.moe_intermediate_size // n, cfg.shared_expert_intermediate_size // n
        checks += [(f"{m}.experts", inter, 0), (f"{m}.experts", inter, 1)]
        checks += [(f"{m}.shared_expert.gate_proj", shared, 0), (f"{m}.shared_expert.down_proj", shared, 1)]
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    if dense:
        m = f"model.layers.{dense[0]}.mlp"
        checks += [(f"{m}.gate_proj", cfg.intermediate_size // n, 0), (f"{m}.down_proj", cfg.intermediate_size // n, 1)]
    problems = []
    for module, local, dim in checks:
        block = quant.block_for(module)
        if block is not None and local % block[dim]:
            problems.append(
                f"FP8 {module}: {local} {'rows' if dim == 0 else 'columns'} per rank cut a {block[dim]}-wide block "
                "(each rank's share of a block-FP8 weight must be whole blocks)"
            )
    return list(dict.fromkeys(problems))
