"""`nextserve bench config`: a named geometry written as a Hugging Face `config.json`, with no weights and no
tokenizer, so that `serve`, `LLM` and `bench offline` run the geometry `bench model` times (`--load-format dummy`
adds random weights and a synthetic tokenizer).

The keys are the release checkpoint's (Qwen/Qwen3-Next-80B-A3B-Instruct's config.json: `rope_theta`,
`partial_rotary_factor`, `full_attention_interval`, which transformers' Qwen3NextConfig and `ModelConfig` both
read), with `layer_types` spelled out and one MTP layer declared as the release has.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nextserve.bench.presets import PRESETS, preset_config
from nextserve.model_config import ModelConfig

# The architecture's keys, by transformers' Qwen3NextConfig names (also what `bench model` hands transformers).
_ARCH_KEYS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim linear_num_key_heads "
    "linear_num_value_heads linear_key_head_dim linear_value_head_dim linear_conv_kernel_dim num_experts "
    "num_experts_per_tok moe_intermediate_size shared_expert_intermediate_size intermediate_size norm_topk_prob "
    "decoder_sparse_step hidden_act rope_theta partial_rotary_factor rms_norm_eps max_position_embeddings "
    "tie_word_embeddings attention_bias full_attention_interval bos_token_id"
).split()


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The model's architecture as config.json keys (no bookkeeping keys such as model_type)."""
    d = {k: getattr(cfg, k) for k in _ARCH_KEYS}
    d |= {"layer_types": list(cfg.layer_types), "mlp_only_layers": list(cfg.mlp_only_layers)}
    eos = list(cfg.eos_token_ids)
    d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    d["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return d


def config_json(cfg: ModelConfig) -> dict:
    """A complete config.json for `cfg`, with the bookkeeping keys of the release checkpoint."""
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        **hf_config_dict(cfg),
        # The release tokenizer pads with <|endoftext|>, its bos.
        "pad_token_id": cfg.bos_token_id,
        "num_nextn_predict_layers": 1,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="qwen3-next-80b-a3b", choices=sorted(PRESETS), help="model geometry")
    parser.add_argument("--num-layers", type=int, default=None, help="first N layers (a multiple of 4)")
    parser.add_argument("--out", required=True, help="folder to write config.json into (created if missing)")


def run(args: argparse.Namespace) -> int:
    cfg = preset_config(args.preset, args.num_layers)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    path.write_text(json.dumps(config_json(cfg), indent=2) + "\n")
    print(
        f"wrote {path}: {args.preset}, {cfg.num_hidden_layers} layers, no weights or tokenizer "
        f"(serve it with --model {out} --load-format dummy)"
    )
    return 0
