"""`nextserve bench model` on CPU: the tiny preset end to end (bf16, fp8, both in one run, and TP2 over gloo), the
byte / FLOP cost model on a hand-counted geometry (bf16 and block-FP8) and per rank, the layer slice, the weight-fit
check, random-weight scales, transformers on shared weights, and `bench config`'s config.json."""

import dataclasses
import gc
import json
import math
import weakref

import pytest
import torch

from nextserve import cli
from nextserve.bench import model as bench_model
from nextserve.bench.presets import (
    check_weights_fit,
    decode_bytes,
    expected_experts,
    param_counts,
    prefill_flops,
    preset_config,
    weight_bytes,
)
from nextserve.engine import memory
from nextserve.forward_batch import ForwardBatch
from nextserve.layers.quant import Fp8Config
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.parallel import Communicator, ParallelContext

# H 4, 1 attention + 3 GDN layers, every layer MoE (4 experts, top 2): small enough to count by hand.
HAND = dict(
    vocab_size=10,
    hidden_size=4,
    num_hidden_layers=4,
    full_attention_interval=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=2,
    linear_num_key_heads=1,
    linear_num_value_heads=2,
    linear_key_head_dim=2,
    linear_value_head_dim=2,
    linear_conv_kernel_dim=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=3,
    shared_expert_intermediate_size=5,
    partial_rotary_factor=1.0,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
)


def test_param_counts_by_hand_and_against_the_built_model():
    cfg = ModelConfig.from_dict(HAND)
    n = param_counts(cfg)
    # attention layer: q 4*8 + k,v 2*4*2 + o 4*4 + q/k norms 2*2 = 68
    # GDN layer: qkvz 4*12 + ba 4*4 + conv 8*4 + A_log,dt_bias 4 + norm 2 + out 4*4 = 118
    # MoE dense part: router 4*4 + shared 3*4*5 + shared gate 4 = 80; two layer norms 8; final norm 4
    assert n.dense == 4 + 3 * (8 + 118 + 80) + (8 + 68 + 80) == 778
    assert (n.expert, n.num_moe_layers, n.embed, n.lm_head) == (36, 4, 40, 40)
    assert n.total == 40 + 40 + 778 + 4 * 4 * 36
    for c in (cfg, preset_config("tiny")):
        built = bench_model.build_model(c, torch.device("cpu"), torch.float32)
        assert sum(p.numel() for p in built.parameters()) == param_counts(c).total
    big = preset_config("qwen3-next-80b-a3b", 4)
    with torch.device("meta"):  # the real geometry, without storage
        built = Qwen3NextForCausalLM(big, dtype=torch.bfloat16, with_mtp=False)
    assert sum(p.numel() for p in built.parameters()) == param_counts(big).total


def test_decode_bytes_and_prefill_flops_by_hand():
    cfg = ModelConfig.from_dict(HAND)
    assert expected_experts(4, 2, 2) == pytest.approx(3.0)  # 4 * (1 - 0.5^2)
    b = decode_bytes(cfg, torch.float32, torch.float32, batch=2, context=5)
    # weights: dense 778 + lm_head 40 + 4 layers * 3 experts * 36 + 2 embedding rows * 4, fp32
    assert b["weights"] == pytest.approx((778 + 40 + 432 + 8) * 4)
    assert b["kv"] == 2 * 5 * 16  # K and V, 1 layer, 1 head, dim 2, fp32: 16 bytes per token
    assert b["state"] == 2 * 2 * 3 * (8 * 3 * 4 + 2 * 2 * 2 * 4)  # read + write, 3 layers of conv + ssm
    assert b["total"] == pytest.approx(5032 + 160 + 1536)
    f = prefill_flops(cfg, length=6, chunk=4)
    assert f["weights"] == 2 * (778 + 4 * 2 * 36) * 6
    assert f["attention"] == 4 * 21 * 2 * 2  # keys 1+2+...+6 = 21, Hq 2, D 2, one attention layer
    assert f["lm_head"] == 2 * 4 * 10 * 2  # two chunks
    assert f["total"] == 12792 + 336 + 160
    # bf16 halves the weight and KV bytes; the fp32 SSM state stays.
    half = decode_bytes(cfg, torch.bfloat16, torch.float32, batch=2, context=5)
    assert half["weights"] == pytest.approx(b["weights"] / 2) and half["kv"] == b["kv"] / 2


def test_layer_slice_keeps_the_3_to_1_pattern():
    cfg = preset_config("qwen3-next-80b-a3b", 12)
    assert cfg.full_attention_layers == [3, 7, 11] and len(cfg.linear_attention_layers) == 9
    assert (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (2048, 512, 10, 151936)
    assert cfg.rope.rotary_dim == 64 and cfg.max_position_embeddings == 262144
    # The design's figure: a 12-layer slice is about 41 GB in bf16.
    assert 40e9 < param_counts(cfg).total * 2 < 42e9
    assert preset_config("qwen3-next-80b-a3b").num_hidden_layers == 48
    for bad in (6, 0, 52):
        with pytest.raises(ValueError, match="multiple of 4"):
            preset_config("qwen3-next-80b-a3b", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("nope")


def test_weight_fit_check_raises_before_building(monkeypatch, capsys):
    cfg = preset_config("qwen3-next-80b-a3b")
    need = check_weights_fit(cfg, torch.bfloat16, None)
    assert need == param_counts(cfg).total * 2
    assert check_weights_fit(cfg, torch.bfloat16, need) == need
    with pytest.raises(ValueError, match=r"needs 1\d\d\.\d GiB of weights in bfloat16.*80\.0 GiB free"):
        check_weights_fit(cfg, torch.bfloat16, 80 * 2**30, "qwen3-next-80b-a3b")

    # Through the CLI: a small free-memory figure ends the run with one line, before any model is built.
    def no_build(*a, **k):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(bench_model, "free_memory", lambda device: 1 << 20)
    monkeypatch.setattr(bench_model, "build_model", no_build)
    assert cli.main(["bench", "model", "--preset", "tiny", "--device", "cpu"]) == 2
    assert "GiB of weights" in capsys.readouterr().err


def test_random_weights_have_realistic_scales_and_routing_spreads():
    cfg = preset_config("tiny")
    m = bench_model.build_model(cfg, torch.device("cpu"), torch.float32, seed=1)
    params = dict(m.named_parameters())
    assert params["model.layers.0.input_layernorm.weight"].abs().max() < 0.1  # zero-centred: gain 1 + w
    assert (params["model.layers.0.linear_attn.norm.weight"] - 1).abs().max() < 0.1
    a = params["model.layers.0.linear_attn.A_log"].exp()
    assert a.min() >= 0.01 - 1e-6 and a.max() <= 16 + 1e-4
    w = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert w.std().item() == pytest.approx(1 / math.sqrt(cfg.hidden_size), rel=0.05)
    # Decode 32 sequences once: each MoE layer's router uses most of the 16 experts, as the roofline assumes.
    runner = bench_model.make_runner(m, num_pages=32, num_slots=32, page_size=16, ssm_dtype=torch.float32)
    fb = ForwardBatch.build([1] * 32, [3] * 32, list(range(1, 33)), [[b + 1] for b in range(32)], 16)
    with torch.inference_mode(), bench_model.ExpertCounter(m) as counter:
        out = m(torch.randint(cfg.vocab_size, (32,)), fb)
    assert runner.model is m and torch.isfinite(out).all()
    assert len(counter.distinct) == cfg.num_hidden_layers
    assert min(counter.distinct) >= 0.8 * expected_experts(16, 4, 32)
    assert all(0.3 < mass < 0.98 for mass in counter.top_mass)  # neither uniform nor one-hot


def test_transformers_model_shares_weights_and_matches_logits():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    m = bench_model.build_model(cfg, torch.device("cpu"), torch.float32, seed=2)
    hf = bench_model.transformers_model(m)
    ours = m.model.layers[0].mlp.experts.gate_up_proj
    assert hf.model.layers[0].mlp.experts.gate_up_proj.data_ptr() == ours.data_ptr()  # no second copy
    runner = bench_model.make_runner(m, num_pages=2, num_slots=1, page_size=16, ssm_dtype=torch.float32)
    runner.states.conv.zero_()  # a fresh sequence, as transformers starts one
    runner.states.ssm.zero_()
    ids = torch.randint(cfg.vocab_size, (20,))
    fb = ForwardBatch.build([20], [0], [1], [[1, 2]], 16, logits_indices=list(range(20)))
    with torch.inference_mode():
        got = m.compute_logits(m(ids, fb))
        want = hf(ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "model.json"
    argv = ["bench", "model", "--preset", "tiny", "--device", "cpu", "--batch-sizes", "1,3", "--contexts", "8,40"]
    argv += ["--prefill-lens", "24,40", "--max-num-batched-tokens", "16", "--decode-steps", "2", "--repeats", "2"]
    argv += ["--warmup", "1", "--compare-transformers", "--output-json", str(out)]
    assert cli.main(argv) == 0
    r = json.loads(out.read_text())
    for key in ("device_name", "dtype", "torch_version", "git_revision", "command", "date", "weight_bytes", "params"):
        assert key in r
    assert r["dtype"] == "float32" and r["num_layers"] == 4 and "--contexts 8,40" in r["command"]
    assert all(math.isfinite(v) and v > 0 for v in r["roofline"].values())
    assert [(p["batch"], p["context"]) for p in r["decode"]] == [(1, 8), (3, 8), (1, 40), (3, 40)]
    assert [p["length"] for p in r["prefill"]] == [24, 40]
    for p in r["decode"] + r["prefill"]:
        assert "skipped" not in p
        for key in ("tokens_per_s", "floor_tokens_per_s", "fraction"):
            assert math.isfinite(p[key]) and p[key] > 0
        assert p["fraction"] == pytest.approx(p["tokens_per_s"] / p["floor_tokens_per_s"])
    d = r["decode"][1]
    cfg = preset_config("tiny")
    assert d["bytes"] == pytest.approx(decode_bytes(cfg, torch.float32, torch.float32, 3, 8))
    assert d["floor_tokens_per_s"] == pytest.approx(3 * r["roofline"]["copy_bandwidth"] / d["bytes"]["total"])
    assert 0 < d["experts_touched"] <= cfg.num_experts and d["experts_expected"] == expected_experts(16, 4, 3)
    p = r["prefill"][1]
    assert p["floor_tokens_per_s"] == pytest.approx(40 * r["roofline"]["matmul_rate"] / p["flops"]["total"])
    assert [t["context"] for t in r["transformers"]] == [8, 40]
    for t in r["transformers"]:
        assert t["speedup"] == pytest.approx(t["nextserve_tokens_per_s"] / t["tokens_per_s"])
    table = capsys.readouterr().out
    assert "decode B=3 C=40" in table and "prefill N=40" in table and "transformers B=1 C=8" in table


def test_out_of_memory_point_is_skipped_with_a_note():
    m = bench_model.build_model(preset_config("tiny"), torch.device("cpu"), torch.float32)

    def oom(model, args, roofline, batch, context):
        bench_model.make_runner(model, 1, 1, 16, torch.float32)  # binds pools, which must be unbound after
        raise torch.OutOfMemoryError("simulated")

    row = bench_model.guarded(oom, m, None, {}, batch=8, context=1024)
    assert row == {"batch": 8, "context": 1024, "skipped": "out of device memory"}
    assert all(a.k_cache is None for a in m.attention_layers())


# ---- block-FP8 ----------------------------------------------------------------------------------------------------
def test_fp8_bytes_and_flops_by_hand():
    cfg, fp8 = ModelConfig.from_dict(HAND), Fp8Config()
    # Kept in the model dtype (fp32 here): router 4*16, shared gates 4*4, in_proj_ba 3*16, layer norms 4*8 + final
    # 4, q/k norms 4, gated norms 3*2, conv 3*32, A_log and dt_bias 3*4 = 282 of the 778 dense parameters. FP8:
    # the other 496, each of their 22 weights (attention 4, GDN 2 per layer, shared expert 3 per layer) one partial
    # 128x128 block, so one fp32 scale each.
    w = weight_bytes(cfg, torch.float32, fp8)
    assert (w.dense_fp8, w.dense) == (496, 282 * 4 + 496 + 22 * 4)
    # One expert: gate|up [6, 4] + down [4, 3] in FP8, gate, up and down blocked apart: 3 scales.
    assert (w.expert_fp8, w.expert) == (36, 36 + 3 * 4)
    assert (w.embed, w.lm_head) == (40 * 4, 40 * 4)
    b = decode_bytes(cfg, torch.float32, torch.float32, batch=2, context=5, quant=fp8)
    assert b["weights"] == pytest.approx(w.dense + 160 + 4 * 3 * 48 + 2 * 4 * 4)  # 3 experts hit, 2 fp32 rows
    assert b["kv"] == 2 * 5 * 16  # the cache stays in the model dtype
    f = prefill_flops(cfg, length=6, chunk=4, quant=fp8)
    assert f["weights"] == prefill_flops(cfg, length=6, chunk=4)["weights"]  # the same FLOPs, part at the FP8 rate
    assert f["weights_fp8"] == 2 * (496 + 4 * 2 * 36) * 6
    assert prefill_flops(cfg, length=6, chunk=4)["weights_fp8"] == 0


def test_fp8_decode_bytes_of_the_80b_against_a_meta_build():
    cfg, fp8 = preset_config("qwen3-next-80b-a3b"), Fp8Config()
    with torch.device("meta"):
        built = Qwen3NextForCausalLM(cfg, dtype=torch.bfloat16, with_mtp=False, quant=fp8)
    stored = sum(p.numel() * p.element_size() for p in built.parameters())
    assert weight_bytes(cfg, torch.bfloat16, fp8).total == stored
    assert memory.weight_bytes(cfg, torch.bfloat16, False, fp8) == stored  # the engine's fit check agrees
    # The same figure by hand: every parameter in bf16, minus a byte per FP8 parameter, plus 4 per block scale.
    n = param_counts(cfg)
    kept = 2 * n.embed + 48 * (2048 * 512 + 2048)  # embedding, lm_head, router, shared_expert_gate
    kept += 36 * (2048 * 64 + 8192 * 4 + 32 + 32 + 128)  # in_proj_ba, conv1d, A_log, dt_bias, gated norm
    kept += 48 * 2 * 2048 + 2048 + 12 * 2 * 256  # RMSNorms
    scales = 12 * (64 * 16 + 2 * 4 * 16 + 16 * 32) + 36 * (96 * 16 + 16 * 32)  # attention; GDN qkvz, out
    scales += 48 * (512 * (8 * 16 + 16 * 4) + 2 * 4 * 16 + 16 * 4)  # routed experts; shared expert
    assert stored == 2 * n.total - (n.total - kept) + 4 * scales
    assert 74 * 2**30 < stored < 76 * 2**30  # the FP8 release: about 80 GB
    # Batch 1, weights only (the KV and the fp32 state are the same in both): FP8 reads a bit over half the bytes,
    # lm_head and the embedding row staying bf16.
    ratio = (
        decode_bytes(cfg, torch.bfloat16, torch.float32, 1, 1024, fp8)["weights"]
        / decode_bytes(cfg, torch.bfloat16, torch.float32, 1, 1024)["weights"]
    )
    assert 0.45 < ratio < 0.6


def test_weight_fit_counts_fp8_bytes():
    cfg, h200 = preset_config("qwen3-next-80b-a3b"), 141 * 10**9
    fp8 = weight_bytes(cfg, torch.bfloat16, Fp8Config()).total
    assert check_weights_fit(cfg, torch.bfloat16, h200, quant=Fp8Config()) == fp8
    with pytest.raises(ValueError, match=r"48 layers needs 148\.4 GiB of weights in bfloat16"):
        check_weights_fit(cfg, torch.bfloat16, h200)
    with pytest.raises(ValueError, match=r"needs 74\.9 GiB of weights in block-FP8.*70\.0 GiB free"):
        check_weights_fit(cfg, torch.bfloat16, 70 * 2**30, quant=Fp8Config())


def _small_run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "model.json"
    argv = ["bench", "model", "--preset", "tiny", "--device", "cpu", "--contexts", "8", "--prefill-lens", "20"]
    argv += ["--max-num-batched-tokens", "16", "--decode-steps", "1", "--repeats", "1", "--warmup", "0"]
    assert cli.main([*argv, *extra, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_points(r: dict, quant: Fp8Config | None, roofline: dict) -> None:
    cfg = preset_config("tiny")
    for p in r["decode"] + r["prefill"]:
        assert "skipped" not in p
        for key in ("tokens_per_s", "floor_tokens_per_s", "fraction"):
            assert math.isfinite(p[key]) and p[key] > 0
        assert p["fraction"] == pytest.approx(p["tokens_per_s"] / p["floor_tokens_per_s"])
    d = r["decode"][-1]
    assert d["bytes"] == pytest.approx(decode_bytes(cfg, torch.float32, torch.float32, d["batch"], 8, quant))
    assert d["floor_tokens_per_s"] == pytest.approx(d["batch"] * roofline["copy_bandwidth"] / d["bytes"]["total"])
    p = r["prefill"][0]
    fp8 = p["flops"]["weights_fp8"]
    seconds = (p["flops"]["total"] - fp8) / roofline["matmul_rate"]
    seconds += fp8 / roofline["fp8_matmul_rate"] if quant is not None else 0
    assert p["floor_tokens_per_s"] == pytest.approx(20 / seconds)
    assert r["weight_bytes"] == weight_bytes(cfg, torch.float32, quant).total


def test_tiny_fp8_end_to_end(tmp_path, capsys):
    r = _small_run(tmp_path, "--batch-sizes", "1,2", "--quantization", "fp8", "--compare-transformers")
    assert r["quantization"] == "fp8" and "runs" not in r and "--quantization fp8" in r["command"]
    assert math.isfinite(r["roofline"]["fp8_matmul_rate"]) and r["roofline"]["fp8_matmul_rate"] > 0
    _check_points(r, Fp8Config(), r["roofline"])
    assert r["prefill"][0]["flops"]["weights_fp8"] > 0
    assert r["transformers"] == [] and any("transformers comparison skipped" in n for n in r["notes"])
    assert "block-FP8 matmul" in capsys.readouterr().out


def test_bf16_and_fp8_in_one_run(tmp_path, monkeypatch, capsys):
    built, build = [], bench_model.build_model

    def build_after_the_last_is_freed(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in built), "the previous model is still alive"
        model = build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(bench_model, "build_model", build_after_the_last_is_freed)
    r = _small_run(tmp_path, "--batch-sizes", "2", "--quantization", "bf16,fp8")
    assert len(built) == 2 and [run["quantization"] for run in r["runs"]] == ["bf16", "fp8"]
    assert "decode" not in r and "--quantization bf16,fp8" in r["command"]
    for run, quant in zip(r["runs"], (None, Fp8Config())):
        _check_points(run, quant, r["roofline"])  # one roofline for both
    bf16, fp8 = r["runs"]
    assert fp8["weight_bytes"] < bf16["weight_bytes"]
    assert fp8["decode"][0]["bytes"]["weights"] < bf16["decode"][0]["bytes"]["weights"]
    table = capsys.readouterr().out
    assert "fp8 / bf16" in table and table.count("decode B=2 C=8") == 3  # each run's row, then the ratio's


def test_quantization_flag_is_checked():
    assert bench_model._quantization_list("bf16, fp8") == ["bf16", "fp8"]
    for bad in ("int4", "fp8,fp8", ""):
        with pytest.raises(Exception, match="expected distinct values"):
            bench_model._quantization_list(bad)


# ---- tensor parallelism ---------------------------------------------------------------------------------------------
def test_per_rank_cost_model_matches_a_built_rank():
    """TP2 figures are rank 0's shard: its parameters and bytes as built, its KV heads and state, half the FLOPs."""
    cfg, ctx = preset_config("tiny"), ParallelContext(0, 2)
    rank = bench_model.build_model(cfg, torch.device("cpu"), torch.float32, ctx=ctx, comm=Communicator(ctx))
    assert sum(p.numel() for p in rank.parameters()) == param_counts(cfg, 2).total
    assert (
        sum(p.numel() * p.element_size() for p in rank.parameters()) == weight_bytes(cfg, torch.float32, None, 2).total
    )
    whole, half = param_counts(cfg), param_counts(cfg, 2)
    assert (half.routed, half.embed, half.lm_head) == (whole.routed / 2, whole.embed / 2, whole.lm_head / 2)
    # The pools bench model makes for the rank are the ones its layers bind (per-rank heads, channels, value heads).
    runner = bench_model.make_runner(rank, num_pages=2, num_slots=2, page_size=16, ssm_dtype=torch.float32)
    assert runner.kv.k.shape[-2:] == (rank.attention_layers()[0].num_kv_heads, cfg.head_dim) == (1, 32)
    b1, b2 = (decode_bytes(cfg, torch.float32, torch.float32, 3, 8, tp_size=n) for n in (1, 2))
    assert (b2["kv"], b2["state"]) == (b1["kv"] / 2, b1["state"] / 2)
    assert b1["weights"] / 2 < b2["weights"] < 0.52 * b1["weights"]  # norms and routers are replicated
    f1, f2 = (prefill_flops(cfg, 20, 16, tp_size=n) for n in (1, 2))
    assert (f2["attention"], f2["lm_head"]) == (f1["attention"] / 2, f1["lm_head"] / 2)
    assert f1["weights"] / 2 < f2["weights"] < 0.52 * f1["weights"]


def test_tp2_end_to_end_on_cpu(tmp_path, capsys):
    """--tp-size 2 on the CPU: two gloo processes run every point in lockstep; rank 0's table and JSON come back."""
    r = _small_run(tmp_path, "--batch-sizes", "1,2", "--tp-size", "2")
    assert (r["tp_size"], r["dist_backend"], r["rank_devices"], r["roofline_applies"]) == (
        2,
        "gloo",
        ["cpu"] * 2,
        False,
    )
    assert "--tp-size 2 --dist-backend gloo" in r["command"]
    cfg = preset_config("tiny")
    assert r["weight_bytes"] == weight_bytes(cfg, torch.float32, None, 2).total
    assert r["params"] == dataclasses.asdict(param_counts(cfg))
    assert r["params_per_rank"] == dataclasses.asdict(param_counts(cfg, 2))
    assert [(p["batch"], p["context"]) for p in r["decode"]] == [(1, 8), (2, 8)]
    for p in r["decode"] + r["prefill"]:
        assert "skipped" not in p and math.isfinite(p["tokens_per_s"]) and p["tokens_per_s"] > 0
    d, p = r["decode"][1], r["prefill"][0]
    assert d["bytes"] == pytest.approx(decode_bytes(cfg, torch.float32, torch.float32, 2, 8, tp_size=2))
    assert d["floor_tokens_per_s"] == pytest.approx(2 * r["roofline"]["copy_bandwidth"] / d["bytes"]["total"])
    assert p["flops"] == pytest.approx(prefill_flops(cfg, 20, 16, tp_size=2))
    assert 0 < d["experts_touched"] <= cfg.num_experts
    out = capsys.readouterr().out
    assert "tensor parallel 2 over gloo" in out and "decode B=2 C=8" in out and "prefill N=20" in out
    assert "roofline (one process alone on the device) does not apply" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tp-size", "3"], "tensor-parallel size 3 does not fit this model: num_attention_heads=4"),
        (["--tp-size", "4"], "linear_num_key_heads=2 is not divisible by 4"),
        (["--tp-size", "2", "--quantization", "fp8"], "per rank cut a 128-wide block"),
        (["--tp-size", "0"], "--tp-size must be >= 1"),
        (["--tp-size", "2", "--dist-backend", "nccl"], "--dist-backend nccl needs CUDA devices"),
    ],
)
def test_invalid_tp_sizes_are_clear_errors_before_any_process(monkeypatch, capsys, flags, message):
    import torch.multiprocessing as mp

    def no_start(*a, **k):
        raise AssertionError("no rank process may start")

    monkeypatch.setattr(mp, "start_processes", no_start)
    assert cli.main(["bench", "model", "--preset", "tiny", "--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


def test_tp_rank_devices_and_backend_on_one_gpu(monkeypatch):
    """On a machine with one GPU (faked): NCCL takes one GPU per rank, gloo may put every rank on the named GPU."""
    from nextserve.bench.model_tp import plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def args(device: str, backend: str | None = None):
        return bench_model.argparse.Namespace(tp_size=2, device=device, dist_backend=backend)

    with pytest.raises(ValueError, match=r"puts rank r on cuda:r, but 1 GPU\(s\) are visible"):
        plan(args("cuda"))
    with pytest.raises(ValueError, match="NCCL needs one GPU per rank"):
        plan(args("cuda:0"))
    device, backend, devices = plan(args("cuda:0", "gloo"))
    assert (backend, devices) == ("gloo", [torch.device("cuda", 0)] * 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert plan(args("cuda")) == (torch.device("cuda"), "nccl", [torch.device("cuda", 0), torch.device("cuda", 1)])


# ---- bench config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "layers"), [("qwen3-next-80b-a3b", 12), ("tiny", None)])
def test_bench_config_round_trip(tmp_path, preset, layers):
    argv = ["bench", "config", "--preset", preset, "--out", str(tmp_path / "m")]
    assert cli.main(argv + (["--num-layers", str(layers)] if layers else [])) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json"]  # no weights, no tokenizer
    got = ModelConfig.from_pretrained(tmp_path / "m")
    assert got == dataclasses.replace(preset_config(preset, layers), num_nextn_predict_layers=1)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["model_type"] == "qwen3_next" and raw["architectures"] == ["Qwen3NextForCausalLM"]
    assert raw["torch_dtype"] == "bfloat16" and raw["num_nextn_predict_layers"] == 1
    if preset != "tiny":
        assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (151643, 151645, 151643)
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3NextConfig.from_pretrained(tmp_path / "m")
    assert hf.num_hidden_layers == got.num_hidden_layers and hf.layer_types == list(got.layer_types)
    for key in ("num_experts", "moe_intermediate_size", "vocab_size", "head_dim", "linear_num_value_heads"):
        assert getattr(hf, key) == getattr(got, key)
