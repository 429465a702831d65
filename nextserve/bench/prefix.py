"""`nextserve bench prefix`: time to first token with prefix caching on and off, on a shared-prefix workload.

Contract:
- Workload: one shared "system prompt" of `--shared-len` random token ids, and `--num-requests` prompts that are
  that prefix followed by `--suffix-len` distinct random ids. The requests run one after another through the
  offline engine (`LLM.generate` with one prompt), greedy with `max_tokens` 1, so a request's wall time is its
  time to first token: one prefill step and one sample.
- The same workload runs on two engines built from the same flags (`EngineConfig.add_cli_args`), one with
  `enable_prefix_caching` on and one with it off; each engine first serves one untimed request of the same
  length on an unrelated prompt, so kernel and allocator warm-up is not charged to either side.
- A hybrid model resumes a prefix only where the recurrent state was saved, so the cached tokens per request
  are the shared prefix rounded down to `--prefix-snapshot-interval` (the first request is always a miss).
- Reported per mode: mean, median and p90 TTFT (ms), the first request's TTFT, and the cached tokens per request
  (`RequestOutput.num_cached_tokens`); the speed-ups are off / on for the mean and the median. `same_outputs` says
  whether both engines sampled the same first tokens (a cached prefix must not change the result).
- `run(args)` prints a table, writes every figure and the per-request lists to `--output-json`, and returns 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass

from nextserve.config import EngineConfig


@dataclass(frozen=True)
class ModeResult:
    """One engine's pass over the workload: per-request TTFT (s), cached prompt tokens and first token."""

    ttfts: list[float]
    cached_tokens: list[int]
    first_tokens: list[int]
    snapshot_interval: int = 0  # as the engine resolved it

    def summary(self) -> dict[str, float]:
        ms = sorted(t * 1000.0 for t in self.ttfts)
        # Nearest-rank p90 is enough for a few dozen requests; the mean and median are the headline figures.
        p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
        return {
            "mean_ttft_ms": statistics.fmean(ms),
            "median_ttft_ms": statistics.median(ms),
            "p90_ttft_ms": p90,
            "first_ttft_ms": self.ttfts[0] * 1000.0,
            "mean_cached_tokens": statistics.fmean(self.cached_tokens),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nextserve bench prefix`: the workload, then every engine flag."""
    parser.add_argument("--num-requests", type=int, default=32, help="requests sharing the prefix (default 32)")
    parser.add_argument("--shared-len", type=int, default=1000, help="tokens of the shared prefix (default 1000)")
    parser.add_argument("--suffix-len", type=int, default=16, help="distinct tokens after the prefix (default 16)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompt ids")
    parser.add_argument("--output-json", default=None, help="write every figure and per-request list here")
    EngineConfig.add_cli_args(parser)


def make_prompts(
    vocab: int, shared_len: int, suffix_len: int, num: int, seed: int
) -> tuple[list[int], list[list[int]]]:
    """(warm-up prompt, workload prompts): the workload shares its first `shared_len` ids, the warm-up nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    shared = ids(shared_len)
    warmup = ids(shared_len + suffix_len)
    return warmup, [shared + ids(suffix_len) for _ in range(num)]


def measure(config: EngineConfig, warmup: list[int], prompts: list[list[int]]) -> ModeResult:
    """Build an engine from `config`, warm it up, and time each prompt alone (max_tokens 1)."""
    from nextserve.llm import LLM
    from nextserve.sampling_params import SamplingParams

    llm = LLM(config=config)
    interval = llm.engine.capacity.snapshot_interval
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([warmup], params, use_tqdm=False)
    ttfts, cached, first = [], [], []
    for prompt in prompts:
        start = time.perf_counter()
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        ttfts.append(time.perf_counter() - start)
        cached.append(out.num_cached_tokens)
        first.append(out.outputs[0].token_ids[0])
    # NOTE: the engine holds its KV and state pools (1 GiB by default on CPU); free them before the next
    # engine is built so the two never coexist.
    del llm
    gc.collect()
    return ModeResult(ttfts, cached, first, interval)


def _check(args: argparse.Namespace) -> None:
    for flag in ("num_requests", "shared_len", "suffix_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    """Run both modes, print the table, write JSON; ValueError for bad flags."""
    from nextserve.assets import default_model_path
    from nextserve.engine.engine import resolve_device, resolve_dtype
    from nextserve.loader.model_loader import load_tokenizer

    _check(args)
    # --disable-radix-cache would silently turn the "on" run off: this tool sets prefix caching itself.
    base = EngineConfig.from_cli_args(args).with_updates(disable_tqdm=True, disable_radix_cache=False)
    vocab = len(load_tokenizer(base.model or default_model_path()))
    warmup, prompts = make_prompts(vocab, args.shared_len, args.suffix_len, args.num_requests, args.prompt_seed)
    runs = {mode: measure(base.with_updates(enable_prefix_caching=mode), warmup, prompts) for mode in (True, False)}
    on, off = runs[True].summary(), runs[False].summary()
    device = resolve_device(base.device)
    result = {
        "num_requests": args.num_requests,
        "shared_len": args.shared_len,
        "suffix_len": args.suffix_len,
        "device": str(device),
        "dtype": str(resolve_dtype(base.dtype, device)).removeprefix("torch."),
        "page_size": base.page_size,
        "prefix_snapshot_interval": runs[True].snapshot_interval,
        "speedup_mean": off["mean_ttft_ms"] / on["mean_ttft_ms"],
        "speedup_median": off["median_ttft_ms"] / on["median_ttft_ms"],
        "same_outputs": runs[True].first_tokens == runs[False].first_tokens,
    }
    for name, mode, summary in (("caching_on", True, on), ("caching_off", False, off)):
        per_request = {"ttfts_ms": [t * 1000.0 for t in runs[mode].ttfts], "cached_tokens": runs[mode].cached_tokens}
        result[name] = {**summary, **per_request}

    print(f"{args.num_requests} requests of {args.shared_len} shared + {args.suffix_len} distinct tokens, max_tokens 1")
    print(f"{'prefix cache':<14}{'mean TTFT ms':>14}{'median ms':>11}{'p90 ms':>10}{'first ms':>10}{'cached tok':>12}")
    for label, s in (("on", on), ("off", off)):
        print(
            f"{label:<14}{s['mean_ttft_ms']:>14.1f}{s['median_ttft_ms']:>11.1f}{s['p90_ttft_ms']:>10.1f}"
            f"{s['first_ttft_ms']:>10.1f}{s['mean_cached_tokens']:>12.1f}"
        )
    print(
        f"speed-up {result['speedup_mean']:.2f}x (mean), {result['speedup_median']:.2f}x (median); "
        f"identical first tokens: {result['same_outputs']}"
    )
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    return 0
