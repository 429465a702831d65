"""Async client for OpenAI-compatible servers, shared by `nextserve bench serve` and the evaluations.

Contract:
- `OpenAIClient(base_url, api_key)` is an async context manager around one aiohttp session. `base_url` is
  the server root ("http://host:8000"); a trailing "/v1" is accepted too. It offers `first_model()` (the first
  id of GET /v1/models), `complete(api, payload)` (one non-streaming request, timed) and
  `stream(api, payload)` (one streaming request with the arrival time of every chunk of generated text).
- Nothing here raises for a failed request: HTTP errors, connection errors and error events inside a stream
  come back as `error` strings so a benchmark can count them. User input errors raise ValueError.
- SSE parsing follows what OpenAI-compatible servers send: one JSON object per `data:` line, ending with
  `data: [DONE]`. Blank lines, comments (keep-alives such as ": ping") and other fields are skipped, and a
  stream that ends without [DONE] is accepted.
- `percentile`, `summarize_ms` and `format_table` are the statistics and the text table both tools print.
- `run_eval` is the driver shared by the GSM8K and MMLU evaluations: send every question with bounded
  concurrency, extract and score the answers, print a table and write JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tqdm import tqdm

Api = Literal["completions", "chat"]
_PATHS: dict[str, str] = {"completions": "/completions", "chat": "/chat/completions"}
# Long generations at high concurrency can take many minutes; only a dead server should time a request out.
_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


def api_root(base_url: str) -> str:
    """The "/v1" root of a server given as "http://host:port" or "http://host:port/v1"."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {base_url!r}")
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which server and model to talk to (shared by all tools)."""
    parser.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)",
    )
    parser.add_argument("--model", default=None, help="model name; default: the first id of GET /v1/models")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )


@dataclass
class Completion:
    """One non-streaming request: the generated text, the server's token counts and the wall time."""

    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class StreamResult:
    """One streaming request. Times are `time.perf_counter()` values."""

    start: float
    end: float = 0.0
    # Arrival time of each chunk carrying generated text (content or reasoning), in order.
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] | None = None
    error: str | None = None


def _chunk_text(choice: dict[str, Any], api: Api) -> str:
    """The generated text in one streamed choice; reasoning counts, since it costs decode steps too."""
    if api == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


async def iter_sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The payloads of the `data:` lines of an SSE response, up to (not including) `[DONE]`."""
    buffer = b""
    done = False
    async for piece in response.content.iter_any():
        # NOTE: the body is read to its end even after [DONE]: a response left half-read closes its connection
        # instead of returning it to the pool, and a new connection would add a handshake to the next TTFT.
        if done:
            continue
        buffer += piece
        # A TCP read may end mid-line; only complete lines are parsed, the rest waits for the next read.
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8").rstrip("\r")
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, "event:"/"id:" fields
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            if data:
                yield data
    tail = buffer.decode("utf-8").strip()
    if not done and tail.startswith("data:") and tail[5:].strip() not in ("", "[DONE]"):
        yield tail[5:].strip()


class OpenAIClient:
    """One connection pool to an OpenAI-compatible server."""

    def __init__(self, base_url: str, api_key: str | None = None, max_connections: int = 0) -> None:
        self.root = api_root(base_url)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # aiohttp caps a session at 100 connections by default, which would cap the benchmark's concurrency.
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        connector = aiohttp.TCPConnector(limit=self._max_connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT, headers=self._headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._session is not None
        await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use OpenAIClient inside 'async with'"
        return self._session

    async def first_model(self) -> str:
        """The first model id the server lists; ValueError when it lists none or cannot be reached."""
        try:
            async with self.session.get(self.root + "/models") as response:
                if response.status != 200:
                    raise ValueError(f"GET {self.root}/models returned HTTP {response.status}")
                body = await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            raise ValueError(f"cannot reach {self.root}/models: {exc}") from exc
        models = body.get("data") or []
        if not models:
            raise ValueError(f"{self.root}/models lists no model; pass --model")
        return str(models[0]["id"])

    async def complete(self, api: Api, payload: dict[str, Any]) -> Completion:
        """Send one non-streaming request and time it."""
        start = time.perf_counter()
        result = Completion()
        try:
            async with self.session.post(self.root + _PATHS[api], json=payload) as response:
                body_text = await response.text()
            if response.status != 200:
                result.error = f"HTTP {response.status}: {body_text[:300]}"
            else:
                body = json.loads(body_text)
                choice = body["choices"][0]
                result.text = (choice.get("text") if api == "completions" else choice["message"].get("content")) or ""
                result.finish_reason = choice.get("finish_reason")
                usage = body.get("usage") or {}
                result.prompt_tokens = usage.get("prompt_tokens")
                result.output_tokens = usage.get("completion_tokens")
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.latency_s = time.perf_counter() - start
        return result

    async def stream(self, api: Api, payload: dict[str, Any]) -> StreamResult:
        """Send one streaming request, recording when each chunk of generated text arrives."""
        result = StreamResult(start=time.perf_counter())
        pieces: list[str] = []
        try:
            async with self.session.post(self.root + _PATHS[api], json={**payload, "stream": True}) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                else:
                    async for data in iter_sse_data(response):
                        now = time.perf_counter()
                        event = json.loads(data)
                        if "error" in event:
                            result.error = f"error event: {json.dumps(event['error'])[:300]}"
                            break
                        # The usage chunk of stream_options.include_usage has an empty choices list.
                        if event.get("usage"):
                            result.usage = event["usage"]
                        for choice in event.get("choices") or []:
                            text = _chunk_text(choice, api)
                            if text:
                                result.chunk_times.append(now)
                                pieces.append(text)
        except (TimeoutError, aiohttp.ClientError, ValueError, UnicodeDecodeError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.perf_counter()
        result.text = "".join(pieces)
        return result

    async def complete_all(
        self, api: Api, payloads: Sequence[dict[str, Any]], parallel: int, desc: str, disable_tqdm: bool
    ) -> list[Completion]:
        """Send non-streaming requests with at most `parallel` in flight; results keep the payloads' order."""
        if parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {parallel}")
        limit = asyncio.Semaphore(parallel)
        progress = tqdm(total=len(payloads), desc=desc, disable=disable_tqdm)

        async def one(payload: dict[str, Any]) -> Completion:
            async with limit:
                completion = await self.complete(api, payload)
            progress.update(1)
            return completion

        try:
            return list(await asyncio.gather(*(one(p) for p in payloads)))
        finally:
            progress.close()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as numpy's default."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, median, p90 and p99 of durations given in seconds, reported in milliseconds (None when empty)."""
    if not values_s:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = [v * 1000.0 for v in values_s]
    return {
        "mean": sum(ms) / len(ms),
        "median": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


# Table labels of the `summarize_ms` keys.
STAT_LABELS = {"mean": "Mean", "median": "Median", "p90": "P90", "p99": "P99"}


def format_table(title: str, rows: Sequence[str | tuple[str, object]], width: int = 56) -> str:
    """A two-column text table; a bare string row starts a titled section."""
    lines = [f" {title} ".center(width, "=")]
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(width, "-"))
            continue
        label, value = row
        if value is None:
            shown = "n/a"
        elif isinstance(value, float):
            shown = f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4g}"
        else:
            shown = str(value)
        lines.append(f"{label + ':':<{width - len(shown) - 1}} {shown}")
    lines.append("=" * width)
    return "\n".join(lines)


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write a result file, creating nothing but the file itself."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2)
        out.write("\n")


# ---- the evaluation driver shared by GSM8K and MMLU: send, extract, score, report ----


@dataclass(frozen=True)
class EvalItem:
    """One question: its few-shot prompt (text for the completions API, turns for chat) and its answer."""

    prompt: str | list[dict[str, str]]
    gold: str
    subject: str = ""


def add_eval_arguments(parser: argparse.ArgumentParser, default_max_tokens: int) -> None:
    """The flags every evaluation shares."""
    add_server_arguments(parser)
    parser.add_argument("--num-shots", type=int, default=5, help="few-shot examples per prompt (default 5)")
    parser.add_argument("--parallel", type=int, default=64, help="requests in flight at once (default 64)")
    parser.add_argument("--max-tokens", type=int, default=default_max_tokens, help="generation limit per answer")
    parser.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="completions: one few-shot text prompt; chat: the shots as user/assistant turns",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sample the questions (MMLU: the subjects) with this seed (default: take the first ones)",
    )
    parser.add_argument("--output-json", default=None, help="write the summary and every answer to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; ValueError naming the file and line when one is malformed."""
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
    return records


def select(records: list[Any], count: int | None, seed: int | None) -> list[Any]:
    """The first `count` records, or `count` drawn with `seed` (in file order); all when count is None."""
    if count is None or count >= len(records):
        return list(records)
    if count < 1:
        raise ValueError(f"the number of questions must be at least 1, got {count}")
    if seed is None:
        return records[:count]
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[i] for i in chosen]


def _payload(item: EvalItem, model: str, api: Api, max_tokens: int, stop: list[str]) -> dict[str, Any]:
    # Greedy decoding so that a rerun scores the same; the stop strings end the answer before the model starts
    # writing the next few-shot example.
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0}
    if stop:
        body["stop"] = stop
    if api == "completions":
        assert isinstance(item.prompt, str)
        body["prompt"] = item.prompt
    else:
        assert isinstance(item.prompt, list)
        body["messages"] = item.prompt
    return body


async def _send_all(
    args: argparse.Namespace, items: Sequence[EvalItem], stop: list[str], desc: str
) -> tuple[str, list[Completion], float]:
    async with OpenAIClient(args.base_url, args.api_key) as client:
        model = args.model or await client.first_model()
        payloads = [_payload(item, model, args.api, args.max_tokens, stop) for item in items]
        start = time.perf_counter()
        completions = await client.complete_all(args.api, payloads, args.parallel, desc, args.disable_tqdm)
        return model, completions, time.perf_counter() - start


def score(
    items: Sequence[EvalItem], completions: Sequence[Completion], extract: Callable[[str], str | None]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record per question and the accuracy summary (per subject too, when items carry subjects).

    `extract(text) -> str | None` reads the answer from a reply; None counts as an invalid answer. A failed
    request counts as invalid and wrong.
    """
    records = []
    for index, (item, done) in enumerate(zip(items, completions, strict=True)):
        predicted = None if done.error else extract(done.text)
        records.append(
            {
                "index": index,
                "subject": item.subject or None,
                "gold": item.gold,
                "predicted": predicted,
                "correct": predicted is not None and predicted == item.gold,
                "output": done.text,
                "output_tokens": done.output_tokens,
                "latency_s": done.latency_s,
                "error": done.error,
            }
        )
    n = len(records)
    summary: dict[str, Any] = {
        "num_questions": n,
        "num_correct": sum(r["correct"] for r in records),
        "num_invalid": sum(r["predicted"] is None for r in records),
        "num_errors": sum(r["error"] is not None for r in records),
    }
    summary["accuracy"] = summary["num_correct"] / n
    summary["invalid_rate"] = summary["num_invalid"] / n
    subjects = sorted({r["subject"] for r in records if r["subject"]})
    if subjects:
        per_subject = {}
        for subject in subjects:
            marks = [r["correct"] for r in records if r["subject"] == subject]
            per_subject[subject] = {"num_questions": len(marks), "accuracy": sum(marks) / len(marks)}
        summary["per_subject"] = per_subject
        summary["subject_average_accuracy"] = sum(s["accuracy"] for s in per_subject.values()) / len(subjects)
    return records, summary


def run_eval(
    args: argparse.Namespace,
    task: str,
    items: Sequence[EvalItem],
    extract: Callable[[str], str | None],
    stop: list[str],
    config: dict[str, Any],
) -> int:
    """Ask every question, score the answers, print a table, write JSON; exit code 1 on request errors."""
    if not items:
        raise ValueError(f"{task}: no questions selected")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    model, completions, duration = asyncio.run(_send_all(args, items, stop, desc=task))
    records, accuracy = score(items, completions, extract)
    token_counts = [c.output_tokens for c in completions if c.output_tokens is not None]
    latency = summarize_ms([c.latency_s for c in completions if c.error is None])
    summary: dict[str, Any] = {
        "task": task,
        "model": model,
        "base_url": args.base_url,
        "api": args.api,
        **config,
        **accuracy,
        "duration_s": duration,
        "questions_per_s": len(items) / duration,
        # Servers that omit usage leave the token rate unknown rather than guessed.
        "output_tokens_per_s": sum(token_counts) / duration if token_counts else None,
        "latency_ms": latency,
    }
    rows: list[str | tuple[str, object]] = [
        ("Model", model),
        ("API", args.api),
        ("Questions", len(items)),
        ("Few-shot examples", config.get("num_shots")),
        ("Accuracy", summary["accuracy"]),
        ("Invalid answers", summary["num_invalid"]),
        ("Invalid rate", summary["invalid_rate"]),
        ("Request errors", summary["num_errors"]),
    ]
    if "per_subject" in summary:
        rows.append(("Subjects", len(summary["per_subject"])))
        rows.append(("Subject-average accuracy", summary["subject_average_accuracy"]))
    rows.append("Speed")
    rows += [("Duration (s)", duration), ("Questions/s", summary["questions_per_s"])]
    rows.append(("Output tokens/s", summary["output_tokens_per_s"]))
    rows += [(f"{label} latency (ms)", latency[key]) for key, label in STAT_LABELS.items()]
    print(format_table(f"{task} results", rows))
    first_error = next((r["error"] for r in records if r["error"]), None)
    if first_error:
        print(f"{summary['num_errors']} requests failed; first error: {first_error}", file=sys.stderr)
    if args.output_json:
        write_json(args.output_json, {**summary, "records": records})
    return 1 if first_error else 0


def tool_main(prog: str, doc: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """`python -m` entry point shared by the tools: parse, run, and turn a ValueError into a usage error (exit 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
