"""ModelConfig: the Qwen3-Next architecture read from a Hugging Face `config.json`, validated and frozen.

Every field of the spec (section 1) is here under its config.json name. Derived facts (layer types, which layers
are MoE, the rotary dimension, YaRN parameters) are resolved once, in `from_dict`, so the model never re-derives
them. Overrides (`--json-model-override-args`) are applied before validation; an override of an unknown key is an
error, while unknown keys in config.json itself are tolerated (new transformers versions add bookkeeping keys).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Keys that config.json may carry and that inference does not need.
_IGNORED_KEYS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "router_aux_loss_coef",
    "output_router_logits",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "pad_token_id",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "bad_words_ids",
    "num_labels",
}


class ConfigError(ValueError):
    """A config.json or an override that nextserve cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int
    # YaRN (None when plain RoPE).
    yarn_factor: float | None = None
    yarn_original_max_position: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None
    yarn_truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    intermediate_size: int = 5120
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    full_attention_interval: int = 4
    layer_types: tuple[str, ...] = ()
    num_nextn_predict_layers: int = 0
    quantization_config: dict | None = None
    # Resolved in from_dict.
    rope: RopeConfig = field(default=None)  # type: ignore[assignment]

    # ---- derived views -------------------------------------------------------------------------------------
    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
        known = {f.name for f in fields(cls)} - {"rope"}
        overrides = overrides or {}
        for k in overrides:
            if k not in known and k != "rope_parameters":
                raise ConfigError(f"unknown model config override {k!r}; known keys: {sorted(known)}")
        # rope_parameters is unpacked first (from config.json, then from the overrides), so that a plain
        # override such as partial_rotary_factor wins over what config.json's rope_parameters says.
        d = _unpack_rope_parameters(dict(raw))
        d.update(_unpack_rope_parameters(dict(overrides)))
        model_type = d.get("model_type", "qwen3_next")
        if model_type != "qwen3_next":
            raise ConfigError(f"model_type {model_type!r} is not supported (nextserve serves qwen3_next)")
        unknown = set(d) - known - _IGNORED_KEYS
        if unknown:
            logger.warning("config.json keys ignored by nextserve: %s", sorted(unknown))
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("mlp_only_layers", "layer_types"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
            else:
                kwargs.pop(k, None)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if kwargs.get("num_nextn_predict_layers") is None:
            kwargs.pop("num_nextn_predict_layers", None)
        cfg = cls(**kwargs)
        n = cfg.num_hidden_layers
        if not cfg.layer_types:
            if cfg.full_attention_interval < 1:
                raise ConfigError("full_attention_interval must be >= 1")
            types = tuple(
                "full_attention" if (i + 1) % cfg.full_attention_interval == 0 else "linear_attention" for i in range(n)
            )
            object.__setattr__(cfg, "layer_types", types)
        object.__setattr__(cfg, "rope", cfg._resolve_rope())
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, overrides)

    def _resolve_rope(self) -> RopeConfig:
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        rs = self.rope_scaling
        rope_type = (rs or {}).get("rope_type", (rs or {}).get("type", "default")) if rs else "default"
        if rope_type == "default":
            return RopeConfig(theta=float(self.rope_theta), rotary_dim=rotary_dim)
        if rope_type != "yarn":
            raise ConfigError(f"rope type {rope_type!r} is not supported (use default or yarn)")
        factor = rs.get("factor")
        original = rs.get("original_max_position_embeddings")
        if factor is None:
            # Only when factor is missing do we fall back to the ratio (transformers after PR #40320).
            if not original:
                raise ConfigError("yarn rope_scaling needs 'factor' or 'original_max_position_embeddings'")
            factor = self.max_position_embeddings / original
        original = original or self.max_position_embeddings
        return RopeConfig(
            theta=float(self.rope_theta),
            rotary_dim=rotary_dim,
            yarn_factor=float(factor),
            yarn_original_max_position=int(original),
            yarn_beta_fast=float(rs.get("beta_fast") or 32.0),
            yarn_beta_slow=float(rs.get("beta_slow") or 1.0),
            yarn_attention_factor=rs.get("attention_factor"),
            yarn_truncate=bool(rs.get("truncate", True)),
        )

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(
            len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers",
        )
        bad = set(self.layer_types) - {"full_attention", "linear_attention"}
        need(not bad, f"unknown layer types {sorted(bad)}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads must be a multiple of num_key_value_heads",
        )
        need(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            "linear_num_value_heads must be a multiple of linear_num_key_heads",
        )
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        need(not self.attention_bias, "attention_bias=true is not supported by Qwen3-Next")
        need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor must be in (0, 1]")
        need(
            self.rope.rotary_dim % 2 == 0 and self.rope.rotary_dim > 0,
            "rotary dimension must be even and > 0",
        )
        need(self.rms_norm_eps > 0, "rms_norm_eps must be > 0")
        need(self.decoder_sparse_step >= 1, "decoder_sparse_step must be >= 1")
        need(
            all(0 <= i < self.num_hidden_layers for i in self.mlp_only_layers),
            f"mlp_only_layers {list(self.mlp_only_layers)} out of range",
        )
        if self.num_experts > 0:
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]",
            )
        need(self.num_nextn_predict_layers in (0, 1), "only num_nextn_predict_layers 0 or 1 is supported")
        if self.rope.yarn_factor is not None:
            need(self.rope.yarn_factor >= 1.0, "yarn factor must be >= 1")
            need(math.isfinite(self.rope.yarn_factor), "yarn factor must be finite")
        for t in self.eos_token_ids:
            need(0 <= t < self.vocab_size, f"eos_token_id {t} outside the vocabulary")


def _unpack_rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (new transformers) carries theta, the partial factor and the scaling type in one dict;
    spread it into the flat keys (rope_theta, partial_rotary_factor, rope_scaling) unless those are set."""
    rope_params = d.pop("rope_parameters", None)
    if rope_params:
        for key in ("rope_theta", "partial_rotary_factor"):
            if d.get(key) is None and key in rope_params:
                d[key] = rope_params[key]
        if rope_params.get("rope_type", "default") != "default" and d.get("rope_scaling") is None:
            d["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    return d
