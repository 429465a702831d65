"""Tiny random Qwen3-Next configs and reference models shared by the tests."""

from __future__ import annotations

import torch

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    intermediate_size=40,
    full_attention_interval=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    partial_rotary_factor=0.5,
    rms_norm_eps=1e-6,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)


# Splits two and four ways (TP tests): value heads 3x key heads, KV heads split at TP2 and replicated at TP4.
TP_V3K = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    linear_num_key_heads=4,
    linear_num_value_heads=12,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)


def tiny_config(**overrides) -> dict:
    d = dict(BASE)
    d.update(overrides)
    return d


def hf_model(cfg: dict, seed: int = 0):
    """transformers' Qwen3NextForCausalLM in fp32 with every parameter random (norm weights too, so that the
    zero-centred (1 + w) convention is exercised)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    hf_cfg = Qwen3NextConfig(**cfg)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 4, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(
                    torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def builtin_dir():
    from nextserve.assets import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def engine_config(**overrides) -> dict:
    """A tiny config whose vocabulary fits the built-in tokenizer, so engine tests can use text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(builtin_dir() / "tokenizer.json"))
    vocab = -(-tok.get_vocab_size() // 64) * 64
    d = tiny_config(
        vocab_size=vocab,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    d.update(overrides)
    return d


def per_expert(state: dict) -> dict:
    """transformers keeps experts fused ([E, 2I, H] / [E, H, I]); real checkpoints store one tensor per expert."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def mtp_tensors(state: dict, cfg: dict, seed: int = 1) -> dict:
    """Synthetic mtp.* weights: layer 0 copied from the last full-attention layer, fc and norms random."""
    g = torch.Generator().manual_seed(seed)
    H = cfg["hidden_size"]
    src = max(i for i in range(cfg["num_hidden_layers"]) if (i + 1) % cfg.get("full_attention_interval", 4) == 0)
    out = {
        "mtp.fc.weight": torch.randn(H, 2 * H, generator=g) * 0.08,
        "mtp.pre_fc_norm_embedding.weight": torch.randn(H, generator=g) * 0.1,
        "mtp.pre_fc_norm_hidden.weight": torch.randn(H, generator=g) * 0.1,
        "mtp.norm.weight": torch.randn(H, generator=g) * 0.1,
    }
    for name, t in state.items():
        if name.startswith(f"model.layers.{src}."):
            out["mtp.layers.0." + name[len(f"model.layers.{src}.") :]] = t.clone()
    return out


def write_tiny_checkpoint(
    path,
    cfg: dict,
    *,
    seed: int = 0,
    mtp: bool = False,
    tokenizer: bool = True,
    max_shard_bytes=None,
    generation_config: dict | None = None,
):
    """Writes a random tiny model as a Hugging Face checkpoint (per-expert tensors) and returns the HF model."""
    import json
    import shutil

    from nextserve.loader import write_checkpoint

    ref = hf_model(cfg, seed)
    state = per_expert({k: v.detach().clone() for k, v in ref.state_dict().items()})
    config = dict(cfg, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"])
    if mtp:
        state.update(mtp_tensors(state, cfg))
        config["num_nextn_predict_layers"] = 1
    write_checkpoint(path, state, config, max_shard_bytes=max_shard_bytes)
    if tokenizer:
        for f in TOKENIZER_FILES:
            src = builtin_dir() / f
            if src.exists():
                shutil.copy(src, path / f)
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return ref


@torch.inference_mode()
def prefill_logits(model, prompt: torch.Tensor, page_size: int = 4) -> torch.Tensor:
    """Prefill `prompt` [T] into a Qwen3NextForCausalLM from empty caches; the logits at every position [T, V]."""
    from nextserve.forward_batch import ForwardBatch

    cfg = model.config
    T = prompt.shape[0]
    pages = list(range(1, -(-T // page_size) + 1))  # page 0 stays a dummy, as in the engine
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(len(pages) + 1, page_size, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    for gdn in model.linear_attention_layers():
        gdn.conv_state = torch.zeros(2, gdn.conv1d.weight.shape[0], cfg.linear_conv_kernel_dim - 1)
        gdn.ssm_state = torch.zeros(2, gdn.hv, gdn.dk, gdn.dv)
    batch = ForwardBatch.build([T], [0], [1], [pages], page_size, logits_indices=list(range(T)))
    return model.compute_logits(model(prompt, batch))
