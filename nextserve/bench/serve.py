"""Serving benchmark over the streaming OpenAI API (`nextserve bench serve`), like `vllm bench serve`.

Contract:
- Requests go to `/v1/completions` (or `/v1/chat/completions` with `--endpoint chat`) with `stream: true`,
  `stream_options.include_usage`, greedy sampling, `max_tokens` = the request's output length and
  `ignore_eos: true` (an extra field vLLM, SGLang and nextserve honour) so each request generates exactly
  that many tokens.
- Datasets: `random` prompts of random common English words, or `file`: JSONL of {"prompt", "output_len"}
  (`output_len` defaults to `--random-output-len`; the file is cycled when shorter than `--num-prompts`).
- Token lengths without a tokenizer: each word of the random vocabulary below is one token (with its
  leading space) in the BPE vocabularies of Qwen, Llama and GPT models, so a prompt of I words is about I
  tokens (a chat template adds a few). Reported token counts come from the server's `usage` when it sends
  it; without usage, input tokens are the word-count estimate (file prompts: characters / 4) and output
  tokens the number of content chunks.
- Arrivals are a Poisson process at `--request-rate` (inf: all at once, the default); `--max-concurrency`
  caps requests in flight. `--num-warmups` requests run first, untimed; a failing warm-up aborts the run.
- Metrics (`compute_metrics`): per request TTFT (first content chunk), TPOT ((latency - TTFT) / (output
  tokens - 1)), ITL (gaps between content chunks; a chunk may carry several tokens, e.g. with speculative
  decoding) and end-to-end latency, each summarised as mean, median, p90, p99 in ms; throughputs are over
  the benchmark's duration (first arrival to last completion).
- `run(args)` prints a table, writes JSON with every field and the per-request lists to `--output-json`,
  and returns 0, or 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nextserve.bench.words import WORDS
from nextserve.eval.client import (
    STAT_LABELS,
    Api,
    OpenAIClient,
    StreamResult,
    add_server_arguments,
    format_table,
    summarize_ms,
    tool_main,
    write_json,
)


class WarmupError(RuntimeError):
    """A warm-up request failed: the server, model or flags are wrong, so the run stops before measuring."""


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: its text, its estimated token length and the number of tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestOutput:
    """What one request measured. Times in seconds."""

    success: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def _sample_len(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return rng.randint(low, high)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[BenchRequest]:
    """Prompts of random words, lengths uniform in [len * (1 - ratio), len * (1 + ratio)]."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"random input/output lengths must be >= 1, got {input_len}/{output_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        n_in = _sample_len(rng, input_len, range_ratio)
        n_out = _sample_len(rng, output_len, range_ratio)
        # Independent random words make prompts share no prefix, so a prefix cache cannot flatter the result.
        prompt = " ".join(rng.choices(WORDS, k=n_in))
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


def file_requests(path: str, num: int, default_output_len: int) -> list[BenchRequest]:
    """Requests from a JSONL file of {"prompt", "output_len"}, cycled to `num` entries."""
    entries = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = str(record["prompt"])
                output_len = int(record.get("output_len", default_output_len))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: need a JSON object with 'prompt' ({exc})") from exc
            if output_len < 1:
                raise ValueError(f"{path}:{number}: output_len must be >= 1, got {output_len}")
            # Without a tokenizer, about 4 characters per token is the usual estimate for English text.
            entries.append(BenchRequest(prompt, max(1, len(prompt) // 4), output_len))
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return [entries[i % len(entries)] for i in range(num)]


def request_output(request: BenchRequest, result: StreamResult) -> RequestOutput:
    """Turn the chunk times of one streamed request into its TTFT, ITLs, latency and token counts."""
    if result.error:
        return RequestOutput(success=False, error=result.error)
    if not result.chunk_times:
        return RequestOutput(success=False, error="the stream carried no generated text")
    usage = result.usage or {}
    times = result.chunk_times
    return RequestOutput(
        success=True,
        prompt_len=int(usage.get("prompt_tokens") or request.prompt_len),
        output_len=int(usage.get("completion_tokens") or len(times)),
        ttft=times[0] - result.start,
        itl=[later - earlier for earlier, later in zip(times, times[1:])],
        latency=result.end - result.start,
    )


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float) -> dict[str, Any]:
    """Counts, throughputs and the mean/median/p90/p99 (ms) of TTFT, TPOT, ITL and end-to-end latency."""
    assert duration_s > 0, "the benchmark duration must be positive"
    done = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_len for o in done)
    # TPOT leaves out the first token, whose time is TTFT; a one-token reply has no TPOT.
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in done if o.output_len > 1]
    metrics: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    series = {
        "ttft": [o.ttft for o in done],
        "tpot": tpots,
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    for name, values in series.items():
        for stat, value in summarize_ms(values).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics


def _payload(request: BenchRequest, model: str, endpoint: Api) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


async def _arrivals(count: int, rate: float, seed: int) -> AsyncIterator[int]:
    """Yield 0..count-1, sleeping exponential gaps between them so arrivals form a Poisson process."""
    rng = random.Random(seed)
    for index in range(count):
        yield index
        if rate != math.inf and index + 1 < count:
            await asyncio.sleep(rng.expovariate(rate))


async def benchmark(
    args: argparse.Namespace, requests: Sequence[BenchRequest]
) -> tuple[str, list[RequestOutput], float]:
    """Send every request; returns the model name, the outputs in request order and the duration (s)."""
    async with OpenAIClient(args.base_url, args.api_key, max_connections=args.max_concurrency or 0) as client:
        model = args.model or await client.first_model()
        for i in range(args.num_warmups):
            result = await client.stream(args.endpoint, _payload(requests[0], model, args.endpoint))
            warm = request_output(requests[0], result)
            if not warm.success:
                raise WarmupError(f"warm-up request {i} failed: {warm.error}")

        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        progress = tqdm(total=len(requests), desc="requests", disable=args.disable_tqdm)

        async def one(request: BenchRequest) -> RequestOutput:
            payload = _payload(request, model, args.endpoint)
            if limit is None:
                result = await client.stream(args.endpoint, payload)
            else:
                async with limit:
                    result = await client.stream(args.endpoint, payload)
            progress.update(1)
            return request_output(request, result)

        start = time.perf_counter()
        tasks = []
        async for index in _arrivals(len(requests), args.request_rate, args.seed):
            tasks.append(asyncio.create_task(one(requests[index])))
        try:
            outputs = list(await asyncio.gather(*tasks))
        finally:
            progress.close()
        duration = time.perf_counter() - start
    return model, outputs, duration


def format_report(metrics: dict[str, Any], max_concurrency: int | None, request_rate: float) -> str:
    """The result table printed at the end of a run."""
    rows: list[str | tuple[str, object]] = [
        ("Successful requests", metrics["completed"]),
        ("Failed requests", metrics["failed"]),
        ("Maximum request concurrency", max_concurrency or "unlimited"),
        ("Request rate (req/s)", "inf" if request_rate == math.inf else request_rate),
        ("Benchmark duration (s)", metrics["duration"]),
        ("Total input tokens", metrics["total_input_tokens"]),
        ("Total generated tokens", metrics["total_output_tokens"]),
        ("Request throughput (req/s)", metrics["request_throughput"]),
        ("Input token throughput (tok/s)", metrics["input_throughput"]),
        ("Output token throughput (tok/s)", metrics["output_throughput"]),
        ("Total token throughput (tok/s)", metrics["total_token_throughput"]),
    ]
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name, title in titles.items():
        rows.append(title)
        for stat, label in STAT_LABELS.items():
            rows.append((f"{label} {name.upper()} (ms)", metrics[f"{stat}_{name}_ms"]))
    return format_table("Serving Benchmark Result", rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nextserve bench serve`."""
    add_server_arguments(parser)
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--dataset", choices=["random", "file"], default="random")
    parser.add_argument("--dataset-path", default=None, help="JSONL of {prompt, output_len} for --dataset file")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson arrivals (default inf)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths vary by +- this fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first (default 1)")
    parser.add_argument("--output-json", default=None, help="write all metrics and per-request lists here")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if args.dataset == "file":
        if not args.dataset_path:
            raise ValueError("--dataset file needs --dataset-path")
        if not Path(args.dataset_path).is_file():
            raise ValueError(f"--dataset-path not found: {args.dataset_path}")
        return file_requests(args.dataset_path, args.num_prompts, args.random_output_len)
    return random_requests(
        args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 0, or 1 when a request failed. ValueError for bad flags."""
    requests = _requests(args)
    try:
        model, outputs, duration = asyncio.run(benchmark(args, requests))
    except WarmupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = compute_metrics(outputs, duration)
    print(format_report(metrics, args.max_concurrency, args.request_rate))
    errors = [o.error for o in outputs if not o.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    if args.output_json:
        config = {
            "date": datetime.now().isoformat(timespec="seconds"),
            "base_url": args.base_url,
            "model": model,
            "endpoint": args.endpoint,
            "dataset": args.dataset,
            "num_prompts": args.num_prompts,
            # JSON has no infinity; "inf" keeps the file readable by strict parsers.
            "request_rate": "inf" if args.request_rate == math.inf else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "random_input_len": args.random_input_len,
            "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio,
            "seed": args.seed,
        }
        per_request = {
            "input_lens": [o.prompt_len for o in outputs],
            "output_lens": [o.output_len for o in outputs],
            "ttfts": [o.ttft for o in outputs],
            "itls": [o.itl for o in outputs],
            "latencies": [o.latency for o in outputs],
            "errors": [o.error for o in outputs],
        }
        write_json(args.output_json, {**config, **metrics, **per_request})
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return tool_main("nextserve bench serve", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
