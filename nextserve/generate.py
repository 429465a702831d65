"""`nextserve generate`: offline generation from the command line (the built-in model by default)."""

from __future__ import annotations

import argparse
import json

from nextserve.config import EngineConfig
from nextserve.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineConfig.add_cli_args(parser)


def run(args: argparse.Namespace) -> int:
    from nextserve.llm import LLM

    llm = LLM(config=EngineConfig.from_cli_args(args))
    prompts = args.prompt
    if args.chat:
        tok = llm.tokenizer
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        c = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                    }
                )
            )
        else:
            print(f"--- {prompt!r} ({len(c.token_ids)} tokens, {c.finish_reason})\n{prompt}{c.text}")
    return 0
