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
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model
