"""`nextserve bench offline`: throughput of batched `LLM.generate` against a one-prompt-at-a-time loop.

Both runs use the same engine, the same prompts (random token ids) and greedy decoding with EOS ignored, so they
generate the same number of tokens; the ratio measures what continuous batching buys on this machine.

Decode throughput as users get it from `LLM.generate`: after a warm-up batch (every shape compiled), a batch is
generated with one output token (prefill and first token) and another of the same size with --output-len (fresh random
prompts each time, so the prefix cache helps neither); decode tok/s = prompts x (output_len - 1) / the difference, the
figure to set beside `bench model`'s decode at batch = --num-prompts. `--no-loop` skips the one-at-a-time run (large
models). `--compare-model` also times, in the same run and on the same model, what `bench model` times: one decode step
of the batch at the mid-generation context (input_len + output_len / 2), without the engine around it, and prints the
engine's share of it (on a GPU, leave memory for its pools: e.g. --mem-fraction-static 0.6).

`--json-schema-fraction F` measures what guided decoding costs instead: the same batch is generated with no
constraint and with a fraction F of its requests constrained by a JSON schema (records of a nested object, enough of
them that the JSON cannot end before --output-len, so both batches generate the same tokens), alternately
--repeats times; it prints each run and the median ratio of constrained to unconstrained throughput (pair by pair).
"""

from __future__ import annotations

import argparse
import json
import time

from nextserve.config import EngineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-prompts", type=_counts, default=[64], help="prompts per batch; a comma list runs each batch size in turn"
    )
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    parser.add_argument(
        "--loop", action=argparse.BooleanOptionalAction, default=True, help="also time one prompt at a time"
    )
    parser.add_argument(
        "--compare-model",
        action="store_true",
        help="also time bench model's decode step of the same batch and context on the same model, and print the ratio",
    )
    parser.add_argument(
        "--json-schema-fraction",
        type=float,
        default=0.0,
        help="fraction of the batch constrained by a JSON schema; > 0 compares against the unconstrained batch",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating runs of each batch (--json-schema-fraction)"
    )
    EngineConfig.add_cli_args(parser)


# Never complete before thousands of tokens, so constrained requests run --output-len tokens like the others.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["king", "queen", "fool", "ghost"]},
                    "alive": {"type": "boolean"},
                },
                "required": ["name", "age", "role", "alive"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from nextserve.llm import LLM

    if not 0 <= args.json_schema_fraction <= 1:
        raise SystemExit("--json-schema-fraction must be in [0, 1]")
    llm = LLM(config=EngineConfig.from_cli_args(args).with_updates(disable_tqdm=True))
    bench = measure_guided if args.json_schema_fraction > 0 else measure
    results = [bench(llm, args, n) for n in args.num_prompts]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
    return 0 if all(r.get("same_outputs", True) for r in results) else 1


def measure(llm, args: argparse.Namespace, num_prompts: int) -> dict:
    """One batch size: batched generation (and the one-at-a-time loop unless --no-loop)."""
    import dataclasses

    import torch

    from nextserve.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(args.prompt_seed)
    vocab = len(llm.tokenizer)

    def random_prompts() -> list[list[int]]:
        return [torch.randint(0, vocab, (args.input_len,), generator=g).tolist() for _ in range(num_prompts)]

    # Three sets of prompts, so that no run finds another's prompts in the prefix cache: the warm-up (every prefill
    # and decode shape of this batch, so that kernel compilation and autotuning are not timed), the first-token run
    # and the timed run.
    warm, first, prompts = random_prompts(), random_prompts(), random_prompts()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(warm, dataclasses.replace(params, max_tokens=min(4, args.output_len)), use_tqdm=False)

    t0 = time.perf_counter()
    llm.generate(first, dataclasses.replace(params, max_tokens=1), use_tqdm=False)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = llm.generate(prompts, params, use_tqdm=False)
    t_batched = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in batched)
    decode_tok_s = (tokens - len(prompts)) / (t_batched - t_first) if t_batched > t_first else float("nan")
    result = {
        "num_prompts": num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "device": str(llm.engine.device),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "first_token_s": round(t_first, 3),
        "batched_s": round(t_batched, 3),
        "batched_tok_s": round(tokens / t_batched, 1),
        "decode_tok_s": round(decode_tok_s, 1),
    }
    print(f"{'mode':<10}{'seconds':>10}{'output tok/s':>15}")
    print(f"{'batched':<10}{t_batched:>10.2f}{result['batched_tok_s']:>15.1f}")
    same = True
    if args.loop:
        llm.engine.reset_prefix_cache()  # the loop runs the batch's prompts again: no hits from the batched run
        t0 = time.perf_counter()
        looped = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        t_loop = time.perf_counter() - t0
        same = [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in looped]
        result |= {"loop_s": round(t_loop, 3), "loop_tok_s": round(tokens / t_loop, 1)}
        result |= {"speedup": round(t_loop / t_batched, 2), "same_outputs": same}
        print(f"{'loop':<10}{t_loop:>10.2f}{result['loop_tok_s']:>15.1f}")
        print(f"speed-up {result['speedup']}x; identical greedy outputs: {same}")
    print(f"decode (batch of {num_prompts}, after the first token): {decode_tok_s:.1f} tok/s")
    if args.compare_model:
        result |= compare_model(llm, args, num_prompts, decode_tok_s)
    return result


def compare_model(llm, args: argparse.Namespace, batch: int, decode_tok_s: float) -> dict:
    """`bench model`'s decode point on the engine's own model: the kernels alone, for the engine's ratio. The
    engine's pools are rebound to the model afterwards."""
    from types import SimpleNamespace

    from nextserve.bench import model as bench_model

    engine = llm.engine
    cfg = engine.config
    point_args = SimpleNamespace(
        page_size=cfg.page_size,
        mamba_ssm_dtype=cfg.mamba_ssm_dtype,
        cuda_graph=engine.runner.graphs is not None,
        warmup=2,
        repeats=3,
        decode_steps=10,
    )
    roofline = bench_model.measure_roofline(engine.device, engine.dtype, copy_bytes=2**26, gemm_n=256)
    context = args.input_len + args.output_len // 2
    try:
        point = bench_model.decode_point(engine.model, point_args, roofline, batch, context)
    finally:
        engine.runner.bind_caches()
    if "skipped" in point:
        print(f"bench model decode (batch {batch}, context {context}): skipped, {point['skipped']}")
        return {"model_decode_skipped": point["skipped"]}
    ratio = decode_tok_s / point["tokens_per_s"]
    print(
        f"bench model decode (batch {batch}, context {context}): {point['tokens_per_s']:.1f} tok/s; "
        f"LLM.generate reaches {ratio:.0%} of it"
    )
    return {"model_decode_tok_s": round(point["tokens_per_s"], 1), "generate_over_model": round(ratio, 3)}


def measure_guided(llm, args: argparse.Namespace, num_prompts: int) -> dict:
    """One batch size: unconstrained vs a fraction constrained by BENCH_SCHEMA, alternating runs."""
    import dataclasses
    import statistics

    import torch

    from nextserve.sampling_params import SamplingParams, StructuredOutput

    g = torch.Generator().manual_seed(args.prompt_seed)
    vocab = len(llm.tokenizer)
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=g).tolist() for _ in range(num_prompts)]
    plain = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    guided = dataclasses.replace(plain, structured=StructuredOutput(json=BENCH_SCHEMA))
    f = args.json_schema_fraction
    # Spread the constrained requests over the batch: request i is constrained when floor((i + 1) f) > floor(i f).
    mixed = [guided if int((i + 1) * f) > int(i * f) else plain for i in range(num_prompts)]
    llm.generate(prompts[:2], [plain, guided], use_tqdm=False)  # warm-up, and the grammar compiled
    runs: dict[str, list[float]] = {"plain": [], "guided": []}
    tokens = {}
    print(f"{'run':<6}{'batch':<10}{'seconds':>10}{'output tok/s':>15}")
    for r in range(args.repeats):
        for name, params in (("plain", plain), ("guided", mixed)):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            tokens[name] = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[name].append(tokens[name] / dt)
            print(f"{r:<6}{name:<10}{dt:>10.2f}{tokens[name] / dt:>15.1f}")
    ratios = [gd / pl for gd, pl in zip(runs["guided"], runs["plain"])]
    result = {
        "num_prompts": num_prompts,
        "num_constrained": sum(p is guided for p in mixed),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "device": str(llm.engine.device),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "plain_tok_s": [round(x, 1) for x in runs["plain"]],
        "guided_tok_s": [round(x, 1) for x in runs["guided"]],
        "median_plain_tok_s": round(statistics.median(runs["plain"]), 1),
        "median_guided_tok_s": round(statistics.median(runs["guided"]), 1),
        "median_ratio": round(statistics.median(ratios), 3),
        "same_token_counts": tokens["plain"] == tokens["guided"],
    }
    print(
        f"{result['num_constrained']} of {num_prompts} requests constrained: median "
        f"{result['median_guided_tok_s']} vs {result['median_plain_tok_s']} tok/s unconstrained, "
        f"ratio {result['median_ratio']} (pairwise median)"
    )
    return result
