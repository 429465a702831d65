"""TP2 and TP4 (gloo processes on CPU, fp32) give the TP1 logits within 1e-4 and the same greedy tokens: chunked
prefill then decode over real KV and state pools sized from each rank's layers, the MTP head, block-FP8 weights
quantised on load, and dummy weights. Configs: one KV head (replicated on every rank) with a dense layer and tied
embeddings; value heads = 3x key heads with the two KV heads split at TP2 and replicated at TP4.

One process group per TP degree runs every case (spawning costs more than the tiny models)."""

import pytest
import torch
from tiny import TP_V3K, tiny_config, write_tiny_checkpoint

from .tp_worker import build, drive, run_tp

KV1 = tiny_config(
    num_attention_heads=4,
    num_key_value_heads=1,
    linear_num_key_heads=4,
    linear_num_value_heads=4,
    mlp_only_layers=[0],
    tie_word_embeddings=True,
)
V3K = tiny_config(**TP_V3K)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    kv1 = tmp_path_factory.mktemp("kv1")
    write_tiny_checkpoint(kv1, KV1, seed=1, tokenizer=False)
    v3k = tmp_path_factory.mktemp("v3k")
    write_tiny_checkpoint(v3k, V3K, seed=2, mtp=True, tokenizer=False)
    return {
        "kv1": dict(name="kv1", model_dir=str(kv1), mtp=False),
        "v3k-mtp": dict(name="v3k-mtp", model_dir=str(v3k), mtp=True),
        # 16x16 blocks: every per-rank share at TP2 is whole blocks (the experts' 32 columns: 16 per rank).
        "v3k-fp8": dict(name="v3k-fp8", model_dir=str(v3k), mtp=False, fp8_block=(16, 16)),
        "dummy": dict(name="dummy", config=V3K, mtp=False, dummy=True),
    }


@pytest.fixture(scope="module")
def tp1(jobs):
    torch.manual_seed(0)
    return {name: drive(build(job)) for name, job in jobs.items()}


def _same(ranks: list[dict], ref: dict, name: str, tol: float = 1e-4) -> None:
    want = ref[name]
    assert len(want["tokens"][0]) == 5 and len(want["mtp"]) == (6 if name.endswith("mtp") else 0)
    for rank, got in enumerate(ranks):
        got = got[name]
        assert got["tokens"] == want["tokens"], f"{name} rank {rank}: greedy tokens differ"
        for key in ("logits", "mtp"):
            assert len(got[key]) == len(want[key])
            for step, (a, b) in enumerate(zip(got[key], want[key])):
                err = (a - b).abs().max().item()
                assert err < tol, f"{name} rank {rank} {key} step {step}: max error {err}"


def test_tp2_matches_tp1(jobs, tp1, tmp_path):
    # Two "nodes" of one rank each: the multi-node numbering over one machine.
    ranks = run_tp(2, list(jobs.values()), tmp_path, nnodes=2)
    for name in jobs:
        _same(ranks, tp1, name)


def test_tp4_matches_tp1(jobs, tp1, tmp_path):
    wanted = [jobs["kv1"], jobs["v3k-mtp"]]
    ranks = run_tp(4, wanted, tmp_path)
    for job in wanted:
        _same(ranks, tp1, job["name"])
