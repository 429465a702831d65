"""Oracle 1: our Qwen3-Next against transformers' Qwen3NextForCausalLM on tiny random fp32 configs.

Prefill logits at every position, then 16 single-token decode steps (transformers' own control flow: full prefill,
then T=1 steps from its cache), must agree to 1e-4."""

import zlib

import pytest
import torch
from tiny import hf_model, tiny_config

from nextserve.forward_batch import ForwardBatch
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.models.weights import load_weights

CONFIGS = {
    "base": tiny_config(),
    "gqa8-r1-dense-layer-no-renorm": tiny_config(
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        num_experts=4,
        num_experts_per_tok=1,
        full_attention_interval=3,
        mlp_only_layers=[0, 3],
        norm_topk_prob=False,
    ),
    "yarn-sparse-step": tiny_config(
        num_experts=16,
        num_experts_per_tok=4,
        full_attention_interval=4,
        decoder_sparse_step=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=256,
        partial_rotary_factor=0.25,
        head_dim=32,
    ),
    "tied-wide-linear": tiny_config(
        num_hidden_layers=3,
        linear_num_key_heads=1,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=3,
        full_attention_interval=3,
        tie_word_embeddings=True,
        linear_conv_kernel_dim=3,
    ),
}


def make_model(cfg: dict, ref) -> Qwen3NextForCausalLM:
    mc = ModelConfig.from_dict(dict(cfg))
    model = Qwen3NextForCausalLM(mc, dtype=torch.float32)
    load_weights(model, ref.state_dict().items())
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(64, 4, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    for gdn in model.linear_attention_layers():
        gdn.conv_state = torch.zeros(3, gdn.conv1d.weight.shape[0], mc.linear_conv_kernel_dim - 1)
        gdn.ssm_state = torch.zeros(3, gdn.hv, gdn.dk, gdn.dv)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(name):
    cfg = CONFIGS[name]
    ref = hf_model(cfg, seed=zlib.crc32(name.encode()) % 1000)  # hash() of a str changes with PYTHONHASHSEED
    model = make_model(cfg, ref)
    prompt = torch.randint(0, cfg["vocab_size"], (1, 70), generator=torch.Generator().manual_seed(1))
    pages = list(range(1, 64))
    out = ref(prompt, use_cache=True)
    batch = ForwardBatch.build([70], [0], [2], [pages], 4, logits_indices=list(range(70)))
    ours = model.compute_logits(model(prompt[0], batch))
    assert (ours - out.logits[0]).abs().max().item() < 1e-4
    past, cur = out.past_key_values, 70
    g = torch.Generator().manual_seed(2)
    for _ in range(16):
        tok = torch.randint(0, cfg["vocab_size"], (1, 1), generator=g)
        out = ref(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        ours = model.compute_logits(model(tok[0], ForwardBatch.build([1], [cur], [2], [pages], 4)))
        cur += 1
        assert (ours[0] - out.logits[0, -1]).abs().max().item() < 1e-4


def test_yarn_changes_logits():
    """A YaRN config must not silently fall back to plain RoPE (the transformers factor bug of 2025)."""
    mc = ModelConfig.from_dict(CONFIGS["yarn-sparse-step"])
    assert mc.rope.yarn_factor == 4.0
    plain = ModelConfig.from_dict({k: v for k, v in CONFIGS["yarn-sparse-step"].items() if k != "rope_scaling"})
    from nextserve.layers.rotary import rope_inv_freq

    f_yarn, s_yarn = rope_inv_freq(mc.rope)
    f_plain, s_plain = rope_inv_freq(plain.rope)
    assert s_yarn > 1.0 and s_plain == 1.0
    assert not torch.allclose(f_yarn, f_plain)


def test_yarn_parameters_of_the_real_recipe():
    """Spec section 6: factor 4 over 262144 with 64 rotary dims gives low 14, high 22, factor 1.138629."""
    from nextserve.layers.rotary import rope_inv_freq

    mc = ModelConfig.from_dict(
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}}
    )
    inv, factor = rope_inv_freq(mc.rope)
    base = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
    assert abs(factor - 1.138629) < 1e-6
    assert torch.allclose(inv[:14], base[:14])  # below `low`: extrapolate (unchanged)
    assert torch.allclose(inv[22:], base[22:] / 4)  # above `high`: interpolate
