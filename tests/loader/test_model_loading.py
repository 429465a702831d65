"""Checkpoints in the formats seen in the wild load through `load_model` into a working Qwen3NextForCausalLM.

Formats: transformers' own `save_pretrained` output (single file and sharded), per-expert tensors as the Qwen
release ships them, fused experts ([E, 2I, H] / [E, H, I]), an MTP head, and a synthetic block-FP8 checkpoint
quantised the way Qwen3-Next-80B-A3B-Instruct-FP8 is (spec section 11). Loaded models must give transformers'
logits; broken checkpoints must fail with an error that names the problem.

NOTE: transformers 5.x keeps experts fused in memory but `save_pretrained` converts them back to the release's
per-expert layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`), so the fused layout is written here by hand.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import hf_model, per_expert, prefill_logits, tiny_config, write_tiny_checkpoint

from nextserve.loader import CheckpointError, dequantize_block_fp8, write_checkpoint
from nextserve.loader.model_loader import load_model
from nextserve.model_config import ConfigError, ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.models.weights import WeightsError

CFG = tiny_config()
SEED = 3
PROMPT_LEN = 24
# fp32 throughout, so our model and transformers differ only by summation order.
LOGITS_ATOL = 1e-4


def _config_json(cfg: dict) -> dict:
    return dict(cfg, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"])


def _load(path: Path, **kwargs) -> Qwen3NextForCausalLM:
    return load_model(
        path,
        ModelConfig.from_pretrained(path),
        dtype=torch.float32,
        device=torch.device("cpu"),
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ref():
    return hf_model(CFG, seed=SEED)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ref_logits(ref, prompt) -> torch.Tensor:
    with torch.inference_mode():
        return ref(prompt[None]).logits[0]


@pytest.fixture(scope="module")
def state(ref) -> dict[str, torch.Tensor]:
    """The reference weights under their per-expert checkpoint names."""
    return per_expert({k: v.detach().clone() for k, v in ref.state_dict().items()})


def _tensor_names(path: Path) -> set[str]:
    names: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


# ---- formats that must load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_save_pretrained_checkpoint_matches_transformers(tmp_path, ref, prompt, ref_logits, max_shard_size):
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    ref.save_pretrained(tmp_path, **kwargs)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    if max_shard_size is None:
        assert (tmp_path / "model.safetensors").is_file() and not shards
    else:
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 2
    names = _tensor_names(tmp_path)
    # The layout save_pretrained writes (see the module docstring): per expert, like the released checkpoint.
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)

    model = _load(tmp_path)
    assert model.mtp is None
    assert (prefill_logits(model, prompt) - ref_logits).abs().max().item() < LOGITS_ATOL


def test_fused_expert_checkpoint_matches_transformers(tmp_path, ref, prompt, ref_logits):
    fused = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused  # transformers' in-memory layout
    write_checkpoint(tmp_path, fused, _config_json(CFG))
    model = _load(tmp_path)
    assert (prefill_logits(model, prompt) - ref_logits).abs().max().item() < LOGITS_ATOL


def test_per_expert_sharded_checkpoint_matches_transformers(tmp_path, prompt):
    # Shards of ~8 KB split one layer's experts across files.
    ref = write_tiny_checkpoint(tmp_path, CFG, seed=SEED + 1, tokenizer=False, max_shard_bytes=8000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 5
    with torch.inference_mode():
        expected = ref(prompt[None]).logits[0]
    assert (prefill_logits(_load(tmp_path), prompt) - expected).abs().max().item() < LOGITS_ATOL


# ---- MTP --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mtp")
    write_tiny_checkpoint(path, CFG, seed=SEED, mtp=True, tokenizer=False)
    return path


def test_mtp_tensors_load_into_the_mtp_head(mtp_dir):
    written = load_file(str(mtp_dir / "model.safetensors"))
    model = _load(mtp_dir)
    assert model.mtp is not None
    params = dict(model.named_parameters())
    for name in (
        "mtp.fc.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.norm.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
        "mtp.layers.0.self_attn.k_norm.weight",
        "mtp.layers.0.mlp.gate.weight",
        "mtp.layers.0.mlp.shared_expert.down_proj.weight",
    ):
        assert torch.equal(params[name], written[name]), name
    experts = model.mtp.layers[0].mlp.experts
    prefix = "mtp.layers.0.mlp.experts"
    for e in range(CFG["num_experts"]):
        gate_up = torch.cat([written[f"{prefix}.{e}.gate_proj.weight"], written[f"{prefix}.{e}.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[e], gate_up), e
        assert torch.equal(experts.down_proj[e], written[f"{prefix}.{e}.down_proj.weight"]), e


def test_mtp_tensors_skipped_when_the_head_is_off(mtp_dir, tmp_path, prompt, ref_logits):
    assert _load(mtp_dir, with_mtp=False).mtp is None
    # A config.json without num_nextn_predict_layers (as the Qwen release ships it) defaults to no head.
    for f in mtp_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = _load(tmp_path)
    assert model.mtp is None
    assert (prefill_logits(model, prompt) - ref_logits).abs().max().item() < LOGITS_ATOL


def test_mtp_head_requested_but_absent(tmp_path, state):
    write_checkpoint(tmp_path, state, _config_json(CFG))
    with pytest.raises(WeightsError, match=r"missing tensor 'mtp\."):
        _load(tmp_path, with_mtp=True)


# ---- FP8 --------------------------------------------------------------------------------------------------------

# Shapes divisible by the block, as in the real checkpoint; rows != cols so a transposed scale grid would fail.
FP8_CFG = tiny_config(shared_expert_intermediate_size=32)
FP8_BLOCK = (16, 8)
_FP8_KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_expert_gate", "in_proj_ba", "conv1d", "mtp.fc")


def _fp8_skip(name: str) -> bool:
    """What Qwen3-Next-80B-A3B-Instruct-FP8 leaves unquantised (its modules_to_not_convert, spec section 11)."""
    return any(part in name for part in _FP8_KEPT)


def _by_checkpoint_name(model: Qwen3NextForCausalLM) -> dict[str, torch.Tensor]:
    """The loaded parameters under checkpoint names, packed experts split back into per-expert tensors."""
    return per_expert({k: v.detach() for k, v in model.named_parameters()})


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """(dir, original per-expert weights, quantised tensors as written, unquantised reference model)."""
    path = tmp_path_factory.mktemp("fp8")
    ref = hf_model(FP8_CFG, seed=SEED)
    original = per_expert({k: v.detach().clone() for k, v in ref.state_dict().items()})
    write_checkpoint(path, original, _config_json(FP8_CFG), fp8_block=FP8_BLOCK, fp8_skip=_fp8_skip)
    written = load_file(str(path / "model.safetensors"))
    return path, original, written, ref


def test_fp8_checkpoint_layout_is_the_real_one(fp8):
    _, original, written, _ = fp8
    quantised = {n for n, t in written.items() if t.dtype == torch.float8_e4m3fn}
    assert "model.layers.1.self_attn.q_proj.weight" in quantised
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in quantised
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in quantised
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in quantised
    for kept in ("lm_head.weight", "model.layers.0.mlp.gate.weight", "model.layers.0.linear_attn.in_proj_ba.weight"):
        assert kept not in quantised and written[kept].dtype == torch.float32
    assert {n + "_scale_inv" for n in quantised} == {n for n in written if n.endswith("_scale_inv")}
    assert set(original) == set(written) - {n + "_scale_inv" for n in quantised}


def test_fp8_checkpoint_loads_within_fp8_rounding(fp8):
    path, original, written, _ = fp8
    loaded = _by_checkpoint_name(_load(path))
    assert set(loaded) == set(original)
    for name, w in original.items():
        got = loaded[name]
        if name + "_scale_inv" not in written:
            assert torch.equal(got, w), f"{name} is unquantised and must load exactly"
            continue
        scale = written[name + "_scale_inv"]
        # Per element: half an e4m3 ulp (2^-4 relative) for normals, half a subnormal step (2^-10) times the
        # block scale below them; 2^-8 relative on top covers one extra bf16 rounding on the way.
        per_elem = scale.repeat_interleave(FP8_BLOCK[0], 0).repeat_interleave(FP8_BLOCK[1], 1)
        bound = (2.0**-4 + 2.0**-8) * w.abs() + per_elem * 2.0**-10
        assert ((got - w).abs() <= bound).all(), name
        assert not torch.equal(got, w), f"{name} should carry fp8 rounding"


def _hf_with(cfg: dict, weights: dict[str, torch.Tensor]):
    """A transformers model holding `weights` (checkpoint names), experts fused back into its own layout."""
    model = hf_model(cfg, seed=SEED)
    fused = {}
    for name in model.state_dict():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            fused[name] = torch.stack(
                [
                    torch.cat([weights[f"{prefix}{e}.gate_proj.weight"], weights[f"{prefix}{e}.up_proj.weight"]])
                    for e in range(cfg["num_experts"])
                ]
            )
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            fused[name] = torch.stack([weights[f"{prefix}{e}.down_proj.weight"] for e in range(cfg["num_experts"])])
        else:
            fused[name] = weights[name]
    model.load_state_dict(fused)
    return model


def test_fp8_dequantised_straight_to_the_model_dtype(fp8, prompt):
    path, original, written, _ = fp8
    model = _load(path)
    loaded = _by_checkpoint_name(model)
    expected = {
        name: dequantize_block_fp8(written[name], written[name + "_scale_inv"], FP8_BLOCK, torch.float32)
        if name + "_scale_inv" in written
        else w
        for name, w in original.items()
    }
    wrong = [name for name, w in expected.items() if not torch.equal(loaded[name], w)]
    assert not wrong, f"{len(wrong)} weights differ from their fp32 dequantisation, e.g. {wrong[0]}"
    # End to end: transformers holding the exactly dequantised weights is the oracle.
    with torch.inference_mode():
        ref_logits = _hf_with(FP8_CFG, expected)(prompt[None]).logits[0]
    assert (prefill_logits(model, prompt) - ref_logits).abs().max().item() < LOGITS_ATOL


def test_fp8_logits_stay_close_to_the_unquantised_model(fp8, prompt):
    path, _, _, ref = fp8
    with torch.inference_mode():
        expected = ref(prompt[None]).logits[0]
    err = (prefill_logits(_load(path), prompt) - expected).abs()
    # A loose bound: the tiny random model amplifies weight noise (fp8 rounding moves some MoE routing
    # decisions), so only the average error is held to a fraction of the average logit.
    assert 0 < err.mean().item() < 0.4 * expected.abs().mean().item()


# ---- broken checkpoints -----------------------------------------------------------------------------------------


def _write(path: Path, state: dict[str, torch.Tensor], **kwargs) -> Path:
    write_checkpoint(path, state, _config_json(CFG), **kwargs)
    return path


def _without(state: dict, name: str) -> dict:
    assert name in state
    return {k: v for k, v in state.items() if k != name}


def test_missing_tensor(tmp_path, state):
    _write(tmp_path, _without(state, "model.layers.1.self_attn.q_norm.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor 'model\.layers\.1\.self_attn\.q_norm\.weight'"):
        _load(tmp_path)


def test_missing_single_expert_tensor(tmp_path, state):
    _write(tmp_path, _without(state, "model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        _load(tmp_path)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.layers.0.self_attn.q_proj.weight", (128, 32)),  # layer 0 is linear attention
        ("model.layers.1.mlp.experts.extra.weight", (16, 32)),
        ("model.visual.proj.weight", (4, 4)),
    ],
)
def test_unexpected_tensor(tmp_path, state, name, shape):
    _write(tmp_path, {**state, name: torch.zeros(shape)})
    with pytest.raises(WeightsError, match=rf"unexpected tensor '{name}'"):
        _load(tmp_path)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.layers.1.self_attn.q_proj.weight", (128, 31)),
        ("model.layers.0.linear_attn.conv1d.weight", (64, 1, 3)),
        ("model.embed_tokens.weight", (95, 32)),
        ("model.layers.3.mlp.experts.2.down_proj.weight", (32, 15)),
        ("model.layers.3.mlp.experts.2.gate_proj.weight", (16, 33)),
    ],
)
def test_mis_shaped_tensor(tmp_path, state, name, shape):
    _write(tmp_path, {**state, name: torch.zeros(shape)})
    with pytest.raises(WeightsError, match=rf"{name}.*shape"):
        _load(tmp_path)


@pytest.mark.parametrize("rows", [8, 20])
def test_mis_shaped_expert_gate_rows(tmp_path, state, rows):
    name = "model.layers.3.mlp.experts.2.gate_proj.weight"
    _write(tmp_path, {**state, name: torch.zeros(rows, 32)})
    with pytest.raises(WeightsError, match=rf"{name}.*shape"):
        _load(tmp_path)


def test_expert_index_out_of_range(tmp_path, state):
    name = "model.layers.2.mlp.experts.8.gate_proj.weight"  # the tiny model has experts 0..7
    _write(tmp_path, {**state, name: torch.zeros(16, 32)})
    with pytest.raises(WeightsError, match=rf"'{name}': expert 8 out of range"):
        _load(tmp_path)


def test_missing_config_json(tmp_path, state):
    _write(tmp_path, state)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_fp8_checkpoint_without_its_config(tmp_path, state):
    """Without config.json the scales cannot be interpreted; loading must not treat them as stray tensors."""
    write_checkpoint(tmp_path, state, _config_json(CFG), fp8_block=(8, 8), fp8_skip=_fp8_skip)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="weight_scale_inv.*declares no fp8 quantization_config"):
        load_model(
            tmp_path, ModelConfig.from_dict(CFG), dtype=torch.float32, device=torch.device("cpu"), progress=False
        )


def test_missing_shard(tmp_path, state):
    _write(tmp_path, state, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shards[1].name}'.*does not exist"):
        _load(tmp_path)
