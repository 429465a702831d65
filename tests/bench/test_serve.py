"""The serving benchmark: statistics on synthetic timings, datasets, and whole runs against the fake server."""

import json
import math
import random

import pytest

from nextserve.bench import serve
from nextserve.bench.serve import BenchRequest, RequestOutput, compute_metrics, request_output
from nextserve.eval.client import StreamResult, percentile, summarize_ms
from tests.fake_openai_server import FakeOpenAIServer, FakeServerOptions


def test_percentile_matches_linear_interpolation():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    tens = [float(v) for v in range(1, 11)]
    assert percentile(tens, 90) == pytest.approx(9.1)  # rank 8.1 between 9 and 10
    assert percentile(tens, 0) == 1.0 and percentile(tens, 100) == 10.0
    assert percentile([float(v) for v in range(101)], 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_ms_reports_milliseconds():
    stats = summarize_ms([0.010, 0.020, 0.030, 0.100])
    assert stats["mean"] == pytest.approx(40.0)
    assert stats["median"] == pytest.approx(25.0)
    assert stats["p90"] == pytest.approx(79.0)  # rank 2.7: 30 + 0.7 * 70
    assert summarize_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_request_output_from_chunk_times():
    request = BenchRequest("a b c", prompt_len=3, output_len=5)
    result = StreamResult(start=10.0, end=10.35, chunk_times=[10.1, 10.15, 10.3])
    result.usage = {"prompt_tokens": 7, "completion_tokens": 5}
    out = request_output(request, result)
    assert out.success and out.prompt_len == 7 and out.output_len == 5
    assert out.ttft == pytest.approx(0.1) and out.latency == pytest.approx(0.35)
    assert out.itl == pytest.approx([0.05, 0.15])

    result.usage = None  # no usage: the estimate and the chunk count stand in
    out = request_output(request, result)
    assert out.prompt_len == 3 and out.output_len == 3

    assert not request_output(request, StreamResult(start=0.0, end=1.0)).success
    failed = request_output(request, StreamResult(start=0.0, error="HTTP 500: boom"))
    assert not failed.success and failed.error == "HTTP 500: boom"


def test_compute_metrics_on_synthetic_timings():
    outputs = [
        # TPOT (1.1 - 0.1) / (11 - 1) = 0.1 s
        RequestOutput(True, prompt_len=100, output_len=11, ttft=0.1, itl=[0.1] * 10, latency=1.1),
        # TPOT (2.3 - 0.3) / (5 - 1) = 0.5 s; two tokens per chunk, so only two gaps
        RequestOutput(True, prompt_len=50, output_len=5, ttft=0.3, itl=[1.0, 1.0], latency=2.3),
        # one token: no TPOT
        RequestOutput(True, prompt_len=10, output_len=1, ttft=0.2, itl=[], latency=0.2),
        RequestOutput(False, error="HTTP 500"),
    ]
    m = compute_metrics(outputs, duration_s=4.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 160 and m["total_output_tokens"] == 17
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["input_throughput"] == pytest.approx(40.0)
    assert m["output_throughput"] == pytest.approx(4.25)
    assert m["total_token_throughput"] == pytest.approx(44.25)
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(300.0) and m["p99_tpot_ms"] == pytest.approx(496.0)
    # ITL pools the 12 gaps of all requests: ten of 0.1 s and two of 1.0 s.
    assert m["mean_itl_ms"] == pytest.approx(3000 / 12) and m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p90_itl_ms"] == pytest.approx(910.0)  # rank 9.9: 0.1 + 0.9 * (1.0 - 0.1) s
    assert m["mean_e2el_ms"] == pytest.approx(1200.0) and m["p90_e2el_ms"] == pytest.approx(2060.0)


def test_random_requests_lengths_and_determinism():
    exact = serve.random_requests(5, input_len=40, output_len=7, range_ratio=0.0, seed=1)
    assert all(r.prompt_len == 40 == len(r.prompt.split()) and r.output_len == 7 for r in exact)
    assert len({r.prompt for r in exact}) == 5
    spread = serve.random_requests(200, input_len=100, output_len=50, range_ratio=0.5, seed=2)
    assert all(50 <= r.prompt_len <= 150 and 25 <= r.output_len <= 75 for r in spread)
    assert min(r.prompt_len for r in spread) < 70 and max(r.prompt_len for r in spread) > 130
    assert spread == serve.random_requests(200, input_len=100, output_len=50, range_ratio=0.5, seed=2)
    assert spread != serve.random_requests(200, input_len=100, output_len=50, range_ratio=0.5, seed=3)
    with pytest.raises(ValueError, match="range-ratio"):
        serve.random_requests(1, 10, 10, range_ratio=1.0, seed=0)


def test_file_requests_cycle_and_validate(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 3}\n\n{"prompt": "twelve chars"}\n')
    requests = serve.file_requests(str(path), 5, default_output_len=9)
    assert [r.prompt for r in requests] == ["hello there", "twelve chars"] * 2 + ["hello there"]
    assert [r.output_len for r in requests[:2]] == [3, 9] and requests[1].prompt_len == 3
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        serve.file_requests(str(path), 1, 9)


def bench_argv(url, *extra):
    return ["--base-url", url, "--random-input-len", "30", "--random-output-len", "12", "--disable-tqdm", *extra]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_run_against_fake_server(tmp_path, endpoint, capsys):
    out = tmp_path / "bench.json"
    with FakeOpenAIServer(FakeServerOptions(token_delay_s=0.001)) as server:
        argv = bench_argv(server.url, "--num-prompts", "8", "--endpoint", endpoint, "--output-json", str(out))
        assert serve.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["failed"] == 0 and result["model"] == "fake-model"
    # ignore_eos made every request generate exactly --random-output-len tokens; the fake tokenizer counts
    # one token per word, so the server's usage gives back the requested input length too.
    assert result["total_output_tokens"] == 8 * 12 and result["output_lens"] == [12] * 8
    assert result["total_input_tokens"] == 8 * 30
    assert [len(gaps) for gaps in result["itls"]] == [11] * 8
    assert all(t > 0 for t in result["ttfts"]) and result["request_rate"] == "inf"
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert result[f"mean_{key}_ms"] > 0 and result[f"p99_{key}_ms"] >= result[f"median_{key}_ms"]
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"]
    assert len(server.requests) == 9  # one warm-up
    body = server.requests[-1]
    assert body["ignore_eos"] is True and body["max_tokens"] == 12 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert ("messages" in body) == (endpoint == "chat")
    assert "Successful requests:" in capsys.readouterr().out


@pytest.mark.parametrize("send_usage", [True, False])
def test_several_tokens_per_chunk_and_awkward_sse(tmp_path, send_usage):
    options = FakeServerOptions(tokens_per_chunk=3, send_usage=send_usage, crlf=True, split_writes=True)
    out = tmp_path / "bench.json"
    with FakeOpenAIServer(options) as server:
        argv = bench_argv(server.url, "--num-prompts", "3", "--endpoint", "chat", "--output-json", str(out))
        assert serve.main(argv) == 0
    result = json.loads(out.read_text())
    # 12 tokens in 4 chunks: usage gives 12; without usage only the 4 chunks can be counted.
    assert result["output_lens"] == ([12] * 3 if send_usage else [4] * 3)
    assert [len(gaps) for gaps in result["itls"]] == [3] * 3
    assert result["input_lens"] == [30] * 3  # without usage, the word-count estimate (one token a word)


def test_max_concurrency_is_respected():
    options = FakeServerOptions(token_delay_s=0.002)
    with FakeOpenAIServer(options) as limited:
        assert serve.main(bench_argv(limited.url, "--num-prompts", "12", "--max-concurrency", "3")) == 0
    with FakeOpenAIServer(options) as unlimited:
        assert serve.main(bench_argv(unlimited.url, "--num-prompts", "12")) == 0
    assert limited.max_in_flight == 3
    assert unlimited.max_in_flight > 3


def test_waiting_for_a_slot_is_not_timed(tmp_path):
    # One request at a time, each taking 12 x 5 ms: if queueing counted, later TTFTs would exceed a latency.
    out = tmp_path / "bench.json"
    with FakeOpenAIServer(FakeServerOptions(token_delay_s=0.005)) as server:
        argv = bench_argv(server.url, "--num-prompts", "4", "--max-concurrency", "1", "--output-json", str(out))
        assert serve.main(argv) == 0
    result = json.loads(out.read_text())
    assert max(result["ttfts"]) < min(result["latencies"]) / 2
    assert result["duration"] >= sum(result["latencies"]) * 0.99


def test_request_rate_spaces_arrivals(tmp_path):
    out = tmp_path / "bench.json"
    with FakeOpenAIServer() as server:
        argv = bench_argv(
            server.url, "--num-prompts", "6", "--request-rate", "40", "--seed", "5", "--output-json", str(out)
        )
        assert serve.main(argv) == 0
    rng = random.Random(5)
    gaps = sum(rng.expovariate(40) for _ in range(5))
    result = json.loads(out.read_text())
    assert result["duration"] >= gaps and result["request_rate"] == 40
    assert math.isclose(result["request_throughput"], 6 / result["duration"])


def test_failed_requests_are_counted(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = ["fine one", "please FAIL", "fine two", "STREAMERROR now"]
    prompts.write_text("".join(json.dumps({"prompt": p, "output_len": 4}) + "\n" for p in rows))
    out = tmp_path / "bench.json"
    with FakeOpenAIServer() as server:
        argv = ["--base-url", server.url, "--dataset", "file", "--dataset-path", str(prompts), "--num-prompts", "4"]
        assert serve.main([*argv, "--disable-tqdm", "--output-json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["completed"] == 2 and result["failed"] == 2 and result["total_output_tokens"] == 8
    assert "HTTP 500" in result["errors"][1] and "injected stream error" in result["errors"][3]
    assert result["errors"][0] == "" and "2 requests failed" in capsys.readouterr().err


def test_failed_warmup_aborts(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "FAIL first", "output_len": 4}\n')
    out = tmp_path / "bench.json"
    with FakeOpenAIServer() as server:
        argv = ["--base-url", server.url, "--dataset", "file", "--dataset-path", str(prompts), "--num-prompts", "3"]
        assert serve.main([*argv, "--output-json", str(out)]) == 1
        assert len(server.requests) == 1
    assert not out.exists() and "warm-up request 0 failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-prompts", "0"],
        ["--request-rate", "0"],
        ["--max-concurrency", "0"],
        ["--dataset", "file"],
        ["--dataset", "file", "--dataset-path", "/nonexistent.jsonl"],
        ["--random-range-ratio", "1.5"],
        ["--base-url", "localhost:8000"],
    ],
)
def test_bad_flags_exit_with_usage_error(flags):
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--base-url", "http://127.0.0.1:9", "--model", "m", "--disable-tqdm", *flags])
    assert exit_info.value.code == 2
