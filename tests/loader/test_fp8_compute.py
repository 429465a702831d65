"""Block-FP8 checkpoints are computed in FP8: loading keeps the stored float8_e4m3fn weights and their scales
(per-expert and fused expert layouts, sharded files, the MTP head), `--quantization fp8` quantises a bf16
checkpoint to the same thing while loading, and the engine generates with either. CPU: the reference path."""

import json
import logging
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import TOKENIZER_FILES, builtin_dir, hf_model, per_expert, prefill_logits, tiny_config

from nextserve import LLM, SamplingParams
from nextserve.config import EngineConfig
from nextserve.layers.linear import Linear
from nextserve.layers.quant import Fp8Config
from nextserve.loader import CheckpointError, write_checkpoint
from nextserve.loader.checkpoint import fp8_modules, iter_checkpoint
from nextserve.loader.model_loader import load_model, resolve_quantization
from nextserve.model_config import ModelConfig
from nextserve.ops import fp8, moe

BLOCK = (128, 128)
# Wider than one block with partial blocks everywhere: 160 = 128 + 32, 136 = 128 + 8.
CFG = tiny_config(
    hidden_size=160,
    moe_intermediate_size=136,
    shared_expert_intermediate_size=136,
    num_experts=4,
    num_nextn_predict_layers=1,
)
_KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_expert_gate", "in_proj_ba", "conv1d", "A_log")


def official_skip(name: str) -> bool:
    """What Qwen3-Next-80B-A3B-Instruct-FP8 leaves unquantised (spec section 11)."""
    return any(part in name for part in _KEPT)


def _config_json(cfg: dict) -> dict:
    return dict(cfg, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"])


def _state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from tiny import mtp_tensors

    ref = hf_model(cfg, seed)
    state = per_expert({k: v.detach().clone() for k, v in ref.state_dict().items()})
    state.update(mtp_tensors(state, cfg))
    return state


def _load(path, quant, **kw):
    return load_model(
        path, ModelConfig.from_pretrained(path), dtype=torch.float32, device=torch.device("cpu"),
        progress=False, quant=quant, with_mtp=True, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """An FP8 checkpoint in the official layout, in three shards, MTP head included."""
    path = tmp_path_factory.mktemp("fp8-official")
    write_checkpoint(
        path, _state(CFG), _config_json(CFG), fp8_block=BLOCK, fp8_skip=official_skip, max_shard_bytes=400_000
    )
    return path


def _stored(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_fp8_checkpoint_keeps_its_bytes(fp8_dir):
    stored = _stored(fp8_dir)
    assert len(list(fp8_dir.glob("model-*.safetensors"))) > 1, "the checkpoint should be sharded"
    quant = resolve_quantization(fp8_dir, None)
    assert quant.block == BLOCK and "model.layers.0.mlp.experts" in quant.modules and "mtp.fc" in quant.modules
    assert "model.layers.0.mlp.gate" not in quant.modules and "lm_head" not in quant.modules
    model = _load(fp8_dir, quant)
    params = dict(model.named_parameters())
    fp8_names = {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    assert any(n.startswith("mtp.") for n in fp8_names)
    for name in fp8_names:
        scale = stored[name + "_scale_inv"]
        if ".mlp.experts." in name:  # per-expert tensors: compare against the packed rows
            prefix, e, proj = name.rsplit(".", 3)[0], int(name.split(".")[-3]), name.split(".")[-2]
            packed = params[prefix + (".down_proj" if proj == "down_proj" else ".gate_up_proj")]
            packed_scale = params[prefix + (".down_proj" if proj == "down_proj" else ".gate_up_proj") + "_scale_inv"]
            I, nb = CFG["moe_intermediate_size"], -(-CFG["moe_intermediate_size"] // BLOCK[0])
            rows = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I), "down_proj": slice(None)}[proj]
            srows = {"gate_proj": slice(0, nb), "up_proj": slice(nb, 2 * nb), "down_proj": slice(None)}[proj]
            got, got_scale = packed[e, rows], packed_scale[e, srows]
        else:
            got, got_scale = params[name], params[name + "_scale_inv"]
        assert got.dtype == torch.float8_e4m3fn, name
        assert torch.equal(got.view(torch.uint8), stored[name].view(torch.uint8)), f"{name}: bytes changed"
        assert torch.equal(got_scale, scale), name
    kept = [n for n, t in stored.items() if t.dtype == torch.float32 and n in params]
    assert "model.layers.0.linear_attn.in_proj_ba.weight" in kept
    for name in kept:
        assert params[name].dtype == torch.float32 and torch.equal(params[name], stored[name]), name


def test_fp8_modules_follow_the_scales_not_the_names(fp8_dir):
    """A module is FP8 exactly when the checkpoint stores a scale for it (modules_to_not_convert agrees)."""
    mods = fp8_modules(fp8_dir)
    kept = set(json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    assert mods and not (mods & kept)
    assert "model.layers.2.linear_attn.in_proj_ba" in kept and "lm_head" in kept


def test_fused_fp8_experts_load_like_per_expert(fp8_dir, tmp_path):
    stored = _stored(fp8_dir)
    fused: dict[str, torch.Tensor] = {}
    E = CFG["num_experts"]
    for name, t in stored.items():
        parts = name.split(".")
        if ".mlp.experts." not in name:
            fused[name] = t
        elif parts[-3] == "0" and parts[-2] == "gate_proj" and parts[-1] == "weight":
            prefix = ".".join(parts[:-3])
            for kind in ("", "_scale_inv"):
                gate = [stored[f"{prefix}.{e}.gate_proj.weight{kind}"] for e in range(E)]
                up = [stored[f"{prefix}.{e}.up_proj.weight{kind}"] for e in range(E)]
                down = [stored[f"{prefix}.{e}.down_proj.weight{kind}"] for e in range(E)]
                fused[f"{prefix}.gate_up_proj{kind}"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
                fused[f"{prefix}.down_proj{kind}"] = torch.stack(down)
    write_checkpoint(tmp_path, fused, json.loads((fp8_dir / "config.json").read_text()))
    quant = resolve_quantization(tmp_path, None)
    assert quant.modules == resolve_quantization(fp8_dir, None).modules
    a, b = _load(fp8_dir, quant), _load(tmp_path, quant)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p.float(), q.float()), name
    # The reader still dequantises fused FP8 experts when asked for plain tensors.
    plain = dict(iter_checkpoint(tmp_path, dtype=torch.float32, progress=False))
    assert plain["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.float32


def _prefill_logits(model, T: int = 20) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(2))
    return prefill_logits(model, ids)


def _quantised_input(x: torch.Tensor) -> torch.Tensor:
    """What FP8 compute does to a GEMM's input: quantise per token per 128 channels and back (fp32)."""
    return fp8.dequantize_act(*fp8.quantize_act(x.reshape(-1, x.shape[-1]), BLOCK[1]), BLOCK[1]).view(x.shape)


def test_fp8_model_is_the_dequantised_model_on_quantised_inputs(fp8_dir, monkeypatch):
    """The FP8 model equals the same checkpoint dequantised to fp32 in which exactly the GEMMs whose weights are FP8
    see their inputs quantised (the FP8 linears, the routed experts) and nothing else does: FP8 changes operands,
    never the algorithm, and every FP8 module of the checkpoint is computed in FP8."""
    quant = resolve_quantization(fp8_dir, None)
    fp8_logits = _prefill_logits(_load(fp8_dir, quant))
    twin = _load(fp8_dir, None)  # quant=None: the reader dequantises every FP8 tensor
    plain_logits = _prefill_logits(twin)
    for name, module in twin.named_modules():
        if name in quant.modules and isinstance(module, Linear):
            w = module.weight
            monkeypatch.setattr(module, "forward", lambda x, w=w: F.linear(_quantised_input(x), w))
    experts_f = types.SimpleNamespace(linear=lambda x, w: F.linear(_quantised_input(x), w), silu=F.silu)
    monkeypatch.setattr(moe, "F", experts_f)  # the CPU expert loop's GEMMs
    twin_logits = _prefill_logits(twin)
    torch.testing.assert_close(fp8_logits, twin_logits, rtol=1e-4, atol=1e-4)
    # Activation quantisation does change the result (the tiny random model's routing amplifies it a lot).
    assert not torch.allclose(fp8_logits, plain_logits, atol=1e-3)


@pytest.fixture(scope="module")
def builtin_fp8_dir(tmp_path_factory):
    """The built-in bf16 model written as an official-layout FP8 checkpoint, tokenizer and configs beside it."""
    src = builtin_dir()
    path = tmp_path_factory.mktemp("builtin-fp8")
    state = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    write_checkpoint(path, state, config, fp8_block=BLOCK, fp8_skip=official_skip)
    for f in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    return path


def test_quantize_on_load_equals_the_fp8_checkpoint(builtin_fp8_dir, caplog):
    """`--quantization fp8` on the bf16 built-in model builds the very weights its FP8 checkpoint stores, so the
    two generate the same greedy text; the weights log shows FP8 bytes."""
    params = SamplingParams(temperature=0, max_tokens=24)
    with caplog.at_level(logging.INFO, logger="nextserve.engine.engine"):
        from_ckpt = LLM(model=str(builtin_fp8_dir), disable_tqdm=True)
    assert "float8_e4m3fn" in caplog.text and "block scales" in caplog.text
    on_load = LLM(quantization="fp8", disable_tqdm=True)
    a_params = dict(from_ckpt.engine.model.named_parameters())
    for name, p in on_load.engine.model.named_parameters():
        q = a_params[name]
        assert p.dtype == q.dtype, name
        if p.dtype == torch.float8_e4m3fn:
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8)), name
    prompts = ["ROMEO:", "JULIET:\nO Romeo"]
    a = [o.outputs[0].token_ids for o in from_ckpt.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in on_load.generate(prompts, params)]
    assert a == b and all(len(t) > 0 for t in a)
    bf16 = [o.outputs[0].token_ids for o in LLM(disable_tqdm=True).generate(prompts, params)]
    assert bf16 != a  # FP8 rounding changes something over 48 greedy tokens of this model


def test_unsupported_fp8_formats_are_named(tmp_path, fp8_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    for key, value, message in [
        ("weight_block_size", [64, 64], r"weight_block_size \[64, 64\]"),
        ("quant_method", "awq", "quant_method 'awq'"),
        ("activation_scheme", "static", "activation_scheme 'static'"),
    ]:
        bad = dict(config, quantization_config=dict(config["quantization_config"], **{key: value}))
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            resolve_quantization(tmp_path, None)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")


def test_quantization_rule_without_a_checkpoint():
    rule = Fp8Config()
    assert rule.block_for("model.layers.3.self_attn.q_proj") == BLOCK
    assert rule.block_for("model.layers.0.mlp.experts") == BLOCK
    for kept in ("lm_head", "model.layers.0.linear_attn.in_proj_ba", "model.layers.2.mlp.gate"):
        assert rule.block_for(kept) is None
    assert Fp8Config(skip=("model.layers.1",)).block_for("model.layers.1.self_attn.q_proj") is None
