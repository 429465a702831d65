"""ModelConfig.from_dict / from_pretrained: what is derived from the real 80B-A3B config.json, which spellings of
RoPE settings are read, how overrides apply, and which inconsistent configs are refused with a clear ConfigError."""

import dataclasses
import json
import logging

import pytest

from nextserve.model_config import ConfigError, ModelConfig

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct, as listed in spec section 1 (raw keys, old transformers style).
REAL = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "intermediate_size": 5120,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rope_theta": 10000000,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "use_sliding_window": False,
    "use_cache": True,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0",
}

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}


def real(**changes) -> dict:
    return {**REAL, **changes}


def test_real_config_derivations():
    cfg = ModelConfig.from_dict(REAL)
    assert cfg.full_attention_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
    assert cfg.linear_attention_layers == [i for i in range(48) if (i + 1) % 4 != 0]
    assert len(cfg.layer_types) == 48
    assert all(cfg.is_moe_layer(i) for i in range(48))
    assert cfg.rope.rotary_dim == 64 and cfg.rope.theta == 1e7 and cfg.rope.yarn_factor is None
    # Sizes the weights are checked against (spec section 2: conv1d [8192, 1, 4]).
    assert (cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_dim) == (2048, 4096, 8192)
    assert cfg.eos_token_ids == (151645,)
    assert cfg.num_nextn_predict_layers == 0  # the release's config.json has no MTP field
    for key in ("vocab_size", "num_experts", "num_experts_per_tok", "head_dim", "max_position_embeddings"):
        assert getattr(cfg, key) == REAL[key]


def test_config_is_frozen_and_raw_dict_untouched():
    raw = real(rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    before = json.dumps(raw, sort_keys=True)
    cfg = ModelConfig.from_dict(raw, {"num_experts_per_tok": 4})
    assert json.dumps(raw, sort_keys=True) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_experts = 8  # type: ignore[misc]


def test_explicit_layer_types_win_over_the_interval():
    types = ["full_attention" if i in (0, 5) else "linear_attention" for i in range(48)]
    cfg = ModelConfig.from_dict(real(layer_types=types))
    assert cfg.full_attention_layers == [0, 5]
    assert cfg.layer_types == tuple(types)


def test_interval_and_sparse_step_and_dense_layers():
    cfg = ModelConfig.from_dict(real(full_attention_interval=3, decoder_sparse_step=2, mlp_only_layers=[1, 5]))
    assert cfg.full_attention_layers == list(range(2, 48, 3))
    assert [i for i in range(48) if cfg.is_moe_layer(i)] == [i for i in range(1, 48, 2) if i not in (1, 5)]


def test_rope_parameters_with_yarn():
    raw = {k: v for k, v in REAL.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling")}
    raw["rope_parameters"] = {**YARN, "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.theta == 5e6 and cfg.rope.rotary_dim == 128
    assert cfg.rope.yarn_factor == 4.0 and cfg.rope.yarn_original_max_position == 262144
    assert cfg.rope.yarn_beta_fast == 32.0 and cfg.rope.yarn_beta_slow == 1.0


def test_rope_parameters_default_is_plain_rope():
    raw = {k: v for k, v in REAL.items() if k not in ("rope_theta", "partial_rotary_factor")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.theta == 1e6 and cfg.rope.rotary_dim == 64 and cfg.rope.yarn_factor is None


def test_old_style_rope_scaling_and_missing_factor():
    cfg = ModelConfig.from_dict(real(rope_scaling={"type": "yarn", "factor": 2.0, "beta_fast": 16}))
    assert cfg.rope.yarn_factor == 2.0 and cfg.rope.yarn_beta_fast == 16.0
    assert cfg.rope.yarn_original_max_position == 262144
    # Without a factor, the ratio of the context lengths stands in for it.
    cfg = ModelConfig.from_dict(real(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 65536}))
    assert cfg.rope.yarn_factor == 4.0


def test_overrides_apply_before_validation():
    cfg = ModelConfig.from_dict(
        REAL, {"num_experts_per_tok": 4, "rope_scaling": YARN, "max_position_embeddings": 1 << 20}
    )
    assert cfg.num_experts_per_tok == 4
    assert cfg.max_position_embeddings == 1 << 20
    assert cfg.rope.yarn_factor == 4.0
    with pytest.raises(ConfigError, match="num_experts_per_tok=600"):
        ModelConfig.from_dict(REAL, {"num_experts_per_tok": 600})


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown model config override 'num_expert'"):
        ModelConfig.from_dict(REAL, {"num_expert": 64})


def test_partial_rotary_factor_override_beats_rope_parameters():
    raw = {k: v for k, v in REAL.items() if k not in ("rope_theta", "partial_rotary_factor")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}
    assert ModelConfig.from_dict(raw, {"partial_rotary_factor": 0.5}).rope.rotary_dim == 128


def test_unknown_config_keys_are_tolerated(caplog):
    raw = real(
        some_future_key={"a": 1},
        mtp_use_dedicated_embeddings=False,
        quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
    )
    with caplog.at_level(logging.WARNING, logger="nextserve.model_config"):
        cfg = ModelConfig.from_dict(raw)
    assert cfg.quantization_config == raw["quantization_config"]
    assert "some_future_key" in caplog.text and "mtp_use_dedicated_embeddings" in caplog.text
    # Keys that are known to be irrelevant stay quiet.
    assert "router_aux_loss_coef" not in caplog.text


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads must be a multiple of num_key_value_heads"),
        ({"linear_num_key_heads": 12}, "linear_num_value_heads must be a multiple of linear_num_key_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            {"layer_types": ["linear_attention"] * 47 + ["sliding_attention"]},
            r"unknown layer types \['sliding_attention'\]",
        ),
        ({"layer_types": ["linear_attention"] * 47}, "layer_types has 47 entries for 48 layers"),
        ({"num_experts_per_tok": 513}, r"num_experts_per_tok=513 must be in \[1, num_experts=512\]"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
        ({"mlp_only_layers": [0, 48]}, r"mlp_only_layers \[0, 48\] out of range"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
            "rope type 'dynamic' is not supported",
        ),
        ({"rope_scaling": {"rope_type": "yarn"}}, "yarn rope_scaling needs 'factor'"),
        ({"rope_scaling": {**YARN, "factor": 0.5}}, "yarn factor must be >= 1"),
        ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not supported"),
        ({"full_attention_interval": 0}, "full_attention_interval must be >= 1"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"partial_rotary_factor": 0.0}, r"partial_rotary_factor must be in \(0, 1\]"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"num_nextn_predict_layers": 2}, "only num_nextn_predict_layers 0 or 1"),
        ({"eos_token_id": [151645, 200000]}, "eos_token_id 200000 outside the vocabulary"),
    ],
)
def test_inconsistent_config_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(real(**changes))


def test_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(real(eos_token_id=[151645, 151643])))
    cfg = ModelConfig.from_pretrained(tmp_path, {"num_experts_per_tok": 8})
    assert cfg.eos_token_ids == (151645, 151643) and cfg.num_experts_per_tok == 8
    assert cfg.full_attention_layers[0] == 3


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json in"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
