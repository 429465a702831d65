"""`--load-format dummy`: random weights of realistic scales for a folder holding only config.json (bf16/fp32 and
block-FP8), a synthetic tokenizer, and the commands that take the flag (generate, bench offline)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from nextserve import LLM, SamplingParams
from nextserve.assets import default_model_path
from nextserve.bench.presets import PRESETS, init_random_weights
from nextserve.cli import main
from nextserve.layers.quant import Fp8Config
from nextserve.loader import dummy
from nextserve.loader.dummy import init_dummy_weights
from nextserve.loader.fp8 import FP8_DTYPE, dequantize_block_fp8
from nextserve.loader.model_loader import build_dummy_model
from nextserve.model_config import ModelConfig
from nextserve.models.weights import _quantize

FAST = dict(device="cpu", dtype="float32", disable_tqdm=True, cpu_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """The built-in model's config.json alone: no weights, no tokenizer."""
    path = tmp_path_factory.mktemp("config-only")
    shutil.copy(Path(default_model_path()) / "config.json", path / "config.json")
    return path


def test_generates_text_and_logs_dummy(config_dir, caplog):
    with caplog.at_level(logging.INFO):
        llm = LLM(model=str(config_dir), load_format="dummy", **FAST)
    assert "dummy (random) weights" in caplog.text and "synthetic" in caplog.text
    tok = llm.tokenizer
    prompt = "time year people way day"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]
    c = out.outputs[0]
    assert len(out.prompt_token_ids) == 5 and 0 < len(c.token_ids) <= 6 and c.text.strip()
    # The engine's incremental detokenisation continues the prompt with single spaces between words.
    assert prompt + c.text == tok.decode(out.prompt_token_ids + c.token_ids, skip_special_tokens=True)


def test_fp8_dummy_model_generates(config_dir):
    llm = LLM(model=str(config_dir), load_format="dummy", quantization="fp8", **FAST)
    params = dict(llm.engine.model.named_parameters())
    assert params["model.layers.0.linear_attn.in_proj_qkvz.weight"].dtype == FP8_DTYPE
    assert params["model.layers.0.mlp.experts.gate_up_proj"].dtype == FP8_DTYPE
    assert params["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the router stays unquantised
    out = llm.generate(["time year people"], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert len(out.token_ids) > 0 and out.text.strip()


def _moe_config(**overrides) -> ModelConfig:
    # Experts with I = 128: whole 128-row blocks per gate/up half (the chunked fast path); H = 256: two column blocks.
    d = dict(PRESETS["tiny"], hidden_size=256, moe_intermediate_size=128, num_experts=12)
    d.update(overrides)
    return ModelConfig.from_dict(d)


def _fp8_model(cfg: ModelConfig, seed: int = 0):
    return build_dummy_model(cfg, torch.float32, torch.device("cpu"), False, Fp8Config((128, 128)), seed=seed)


def _expert_dequant(params: dict, prefix: str, e: int) -> torch.Tensor:
    """Expert e's gate_up [2I, H] dequantised half by half."""
    w, s = params[prefix + ".gate_up_proj"][e], params[prefix + ".gate_up_proj_scale_inv"][e]
    wg, wu = w.chunk(2)
    sg, su = s.chunk(2)
    return torch.cat(
        [dequantize_block_fp8(wg, sg, dtype=torch.float32), dequantize_block_fp8(wu, su, dtype=torch.float32)]
    )


@pytest.mark.parametrize("inter", [128, 48])
def test_fp8_weights_have_realistic_scales(monkeypatch, inter):
    # Several expert chunks per layer: each chunk must be drawn and quantised (nothing left as torch.empty).
    monkeypatch.setattr(dummy, "CHUNK_BYTES", 5 * 2 * inter * 256 * 4)
    cfg = _moe_config(moe_intermediate_size=inter)
    params = dict(_fp8_model(cfg).named_parameters())
    qkvz = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    w = dequantize_block_fp8(params[qkvz], params[qkvz + "_scale_inv"], dtype=torch.float32)
    assert w.std().item() == pytest.approx(1 / math.sqrt(cfg.hidden_size), rel=0.1)
    prefix = "model.layers.0.mlp.experts"
    for e in range(cfg.num_experts):
        std = _expert_dequant(params, prefix, e).std().item()
        assert std == pytest.approx(1 / math.sqrt(cfg.hidden_size), rel=0.1), e
    down = params[prefix + ".down_proj"][-1]
    down = dequantize_block_fp8(down, params[prefix + ".down_proj_scale_inv"][-1], dtype=torch.float32)
    assert down.std().item() == pytest.approx(1 / math.sqrt(inter), rel=0.1)


@pytest.mark.parametrize("inter", [128, 48])
def test_expert_quantisation_matches_the_loaders_layout(inter):
    # The packed scales must read as the checkpoint loader writes them: gate's block rows, then the up's.
    w = torch.randn(3, 2 * inter, 200)
    wq, s = torch.empty(w.shape, dtype=FP8_DTYPE), torch.empty(3, 2 * -(-inter // 128), 2)
    dummy._quantize_experts(w, (128, 128), 2, wq, s)
    ref_q, ref_s = _quantize(w, (128, 128), gate_up=True)
    assert torch.equal(s, ref_s) and torch.equal(wq.float(), ref_q.float())


def test_same_seed_same_weights():
    cfg = _moe_config()
    a, b, c = (dict(_fp8_model(cfg, seed).state_dict()) for seed in (0, 0, 1))
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    key = "model.layers.3.self_attn.q_proj.weight"
    assert not torch.equal(a[key].float(), c[key].float())


def test_unquantised_weights_follow_the_bench_rules():
    """bench model's figures stay comparable: the same generator draws, parameter by parameter, as before."""
    assert init_random_weights is init_dummy_weights
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    model = build_dummy_model(cfg, torch.float32, torch.device("cpu"), False, None, seed=3)
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            ref = torch.empty(p.shape).uniform_(0.01, 16, generator=g).log_()
        elif name.endswith("dt_bias"):
            ref = torch.ones(p.shape)
        elif name.endswith("linear_attn.norm.weight"):
            ref = torch.empty(p.shape).normal_(1.0, 0.02, generator=g)
        elif "norm" in name:
            ref = torch.empty(p.shape).normal_(0.0, 0.02, generator=g)
        elif name.endswith("mlp.gate.weight"):
            ref = torch.empty(p.shape).normal_(0.0, 2.0 / math.sqrt(cfg.hidden_size), generator=g)
        elif name.endswith("embed_tokens.weight"):
            ref = torch.empty(p.shape).normal_(0.0, 1.0, generator=g)
        else:
            ref = torch.empty(p.shape).normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
        assert torch.equal(p, ref), name


def test_generate_command_with_dummy_weights(config_dir, capsys):
    argv = ["generate", "--model", str(config_dir), "--load-format", "dummy", "--device", "cpu"]
    argv += ["--prompt", "time year", "--max-tokens", "3", "--json", "--cpu-cache-bytes", str(16 << 20)]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "time year" and 0 < len(line["token_ids"]) <= 3


def test_bench_offline_with_dummy_fp8_weights(config_dir, tmp_path):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", str(config_dir), "--load-format", "dummy", "--quantization", "fp8"]
    argv += ["--device", "cpu", "--num-prompts", "3", "--input-len", "5", "--output-len", "3"]
    argv += ["--cpu-cache-bytes", str(16 << 20), "--output-json", str(out)]
    assert main(argv) == 0  # 0: batched and one-at-a-time greedy outputs agree
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3 and result["batched_tok_s"] > 0 and result["same_outputs"]


def test_bench_offline_decode_rate_without_the_loop(config_dir, tmp_path):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", str(config_dir), "--load-format", "dummy", "--no-loop", "--compare-model"]
    argv += ["--device", "cpu", "--num-prompts", "2", "--input-len", "5", "--output-len", "6"]
    argv += ["--cpu-cache-bytes", str(16 << 20), "--output-json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert "loop_s" not in result and result["decode_tok_s"] > 0
    assert result["first_token_s"] < result["batched_s"]
    # bench model's step on the same model, beside it; the engine's pools are bound again afterwards.
    assert result["model_decode_tok_s"] > 0 and result["generate_over_model"] > 0


def test_bench_offline_several_batch_sizes_in_one_engine(config_dir, tmp_path):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", str(config_dir), "--load-format", "dummy", "--no-loop", "--compare-model"]
    argv += ["--device", "cpu", "--num-prompts", "1,3", "--input-len", "4", "--output-len", "4"]
    argv += ["--cpu-cache-bytes", str(16 << 20), "--output-json", str(out)]
    assert main(argv) == 0
    assert [r["num_prompts"] for r in json.loads(out.read_text())] == [1, 3]


def test_synthetic_tokenizer_takes_the_configs_eos(tmp_path):
    from nextserve.loader.model_loader import load_tokenizer
    from nextserve.model_config import ModelConfig

    assert main(["bench", "config", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    mc = ModelConfig.from_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, synthetic_for=mc)
    assert tok.eos_token_id == mc.eos_token_ids[0] and len(tok) == mc.vocab_size
