"""The client tools end to end against the real nextserve server over the real engine (tiny random fp32 model, CPU):
`bench serve` (both endpoints), `eval gsm8k` and `eval mmlu` (both APIs) complete, print their tables and write
the documented JSON fields; `bench prefix` (through the CLI) reports cache hits only with caching on.

The model is random, so accuracies and timings mean nothing here; what is checked is what the server must
honour for the numbers to be right elsewhere: `ignore_eos` + `max_tokens` (exact output lengths), streamed
`usage`, `stop` strings, greedy determinism, and a failure-free run."""

from __future__ import annotations

import json

import pytest

from nextserve import cli
from nextserve.bench import serve
from nextserve.config import EngineConfig
from nextserve.engine.async_engine import AsyncEngine
from nextserve.engine.engine import Engine
from nextserve.eval import gsm8k, mmlu
from tests.server.conftest import MODEL, LiveServer

# The fields docs/benchmarks.md promises in each tool's JSON.
SERVE_FIELDS = {
    "date",
    "base_url",
    "model",
    "endpoint",
    "num_prompts",
    "request_rate",
    "max_concurrency",
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "total_token_throughput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "errors",
} | {f"{stat}_{name}_ms" for stat in ("mean", "median", "p90", "p99") for name in ("ttft", "tpot", "itl", "e2el")}
EVAL_FIELDS = {
    "task",
    "model",
    "api",
    "num_shots",
    "num_questions",
    "num_correct",
    "num_invalid",
    "num_errors",
    "accuracy",
    "invalid_rate",
    "duration_s",
    "questions_per_s",
    "output_tokens_per_s",
    "latency_ms",
    "records",
}
RECORD_FIELDS = {"index", "subject", "gold", "predicted", "correct", "output", "output_tokens", "latency_s", "error"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    cfg = EngineConfig(
        model=str(tiny_model_dir), dtype="float32", device="cpu", disable_tqdm=True, cpu_cache_bytes=64 << 20
    )
    live = LiveServer(AsyncEngine(Engine(cfg)))
    yield live
    live.stop()


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve(server, tmp_path, endpoint, capsys):
    out = tmp_path / "bench.json"
    argv = ["--base-url", server.url, "--endpoint", endpoint, "--num-prompts", "6", "--max-concurrency", "3"]
    argv += ["--random-input-len", "20", "--random-output-len", "8", "--random-range-ratio", "0.5"]
    assert serve.main([*argv, "--disable-tqdm", "--output-json", str(out)]) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert SERVE_FIELDS <= set(result)
    assert result["model"] == MODEL and result["completed"] == 6 and result["failed"] == 0
    assert result["errors"] == [""] * 6
    # ignore_eos makes the server generate exactly the asked length, which its usage reports back.
    asked = [r.output_len for r in serve.random_requests(6, 20, 8, 0.5, seed=0)]
    assert result["output_lens"] == asked and result["total_output_tokens"] == sum(asked)
    # The tiny tokenizer splits words into one or more tokens (and the chat template adds some): at least as
    # many prompt tokens as words, counted by the server.
    words = [r.prompt_len for r in serve.random_requests(6, 20, 8, 0.5, seed=0)]
    assert all(n >= w for n, w in zip(result["input_lens"], words, strict=True))
    # A chunk carries at least one token: never more gaps than tokens after the first.
    assert all(len(gaps) <= n - 1 for gaps, n in zip(result["itls"], asked, strict=True))
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["latencies"], strict=True))
    assert result["p99_e2el_ms"] >= result["median_e2el_ms"] > 0


@pytest.fixture
def gsm8k_data(tmp_path):
    train = [
        {"question": f"Tom has {i} pens and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(5)
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    test = [{"question": f"Ann has {i} cats and gets 3. How many?", "answer": f"#### {i + 3}"} for i in range(3)]
    write_jsonl(tmp_path / "test.jsonl", test)
    return tmp_path / "test.jsonl"


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_eval_gsm8k(server, gsm8k_data, tmp_path, api, capsys):
    out = tmp_path / "gsm8k.json"
    argv = ["--base-url", server.url, "--data", str(gsm8k_data), "--api", api, "--num-shots", "5"]
    assert gsm8k.main([*argv, "--max-tokens", "12", "--disable-tqdm", "--output-json", str(out)]) == 0
    assert "gsm8k results" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert EVAL_FIELDS <= set(result) and result["model"] == MODEL
    assert result["num_questions"] == 3 and result["num_errors"] == 0 and result["num_shots"] == 5
    assert 0 <= result["num_correct"] <= 3 and result["accuracy"] == result["num_correct"] / 3
    assert [r["gold"] for r in result["records"]] == ["3", "4", "5"]
    for record in result["records"]:
        assert set(record) == RECORD_FIELDS and record["error"] is None
        assert 1 <= record["output_tokens"] <= 12
        # The server honours the "Question:" stop string.
        assert "Question:" not in record["output"]
    assert result["output_tokens_per_s"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["median"]


@pytest.fixture
def mmlu_dir(tmp_path):
    def rows(subject: str, count: int, kind: str) -> list[dict]:
        return [
            {"subject": subject, "question": f"{kind} {subject} {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for i in range(count)
        ]

    write_jsonl(tmp_path / "test.jsonl", rows("zoology", 2, "Q") + rows("astronomy", 2, "Q"))
    write_jsonl(tmp_path / "dev.jsonl", rows("zoology", 5, "Dev") + rows("astronomy", 5, "Dev"))
    return tmp_path


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_eval_mmlu(server, mmlu_dir, tmp_path, api, capsys):
    out = tmp_path / "mmlu.json"
    argv = ["--base-url", server.url, "--data", str(mmlu_dir), "--api", api, "--max-tokens", "4"]
    assert mmlu.main([*argv, "--disable-tqdm", "--output-json", str(out)]) == 0
    assert "mmlu results" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert EVAL_FIELDS | {"per_subject", "subject_average_accuracy"} <= set(result)
    assert result["num_questions"] == 4 and result["num_errors"] == 0
    assert set(result["per_subject"]) == {"astronomy", "zoology"}
    assert [r["gold"] for r in result["records"]] == ["A", "B", "A", "B"]  # subjects sorted
    assert all(1 <= r["output_tokens"] <= 4 for r in result["records"])
    if api == "completions":
        assert all("\n\n" not in r["output"] for r in result["records"])  # the blank-line stop


def test_bench_prefix_through_the_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "prefix.json"
    argv = ["bench", "prefix", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    argv += ["--num-requests", "4", "--shared-len", "160", "--suffix-len", "8", "--prefix-snapshot-interval", "64"]
    assert cli.main([*argv, "--cpu-cache-bytes", str(64 << 20), "--output-json", str(out)]) == 0
    assert "speed-up" in capsys.readouterr().out

    result = json.loads(out.read_text())
    on, off = result["caching_on"], result["caching_off"]
    # The first request is a miss; the rest resume from the deepest snapshot inside the shared prefix.
    assert on["cached_tokens"][0] == 0 and all(160 - 64 <= c <= 160 for c in on["cached_tokens"][1:])
    assert off["cached_tokens"] == [0] * 4
    assert result["same_outputs"] is True
    for mode in (on, off):
        assert (
            len(mode["ttfts_ms"]) == 4 and mode["median_ttft_ms"] > 0 and mode["p90_ttft_ms"] >= mode["median_ttft_ms"]
        )
    assert result["speedup_mean"] == pytest.approx(off["mean_ttft_ms"] / on["mean_ttft_ms"])
