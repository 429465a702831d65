"""GSM8K few-shot accuracy of any OpenAI-compatible server (`nextserve eval gsm8k`).

Contract: `--data` is the GSM8K `test.jsonl` ({"question", "answer"}, the answer ending "#### <number>");
the few-shot examples are the first `--num-shots` records of `train.jsonl` in the same folder. Each question
is asked greedily as "Question: ...\\nAnswer:" after the shots ("Question: ...\\nAnswer: <reasoning> #### n"),
as one completions prompt or as chat turns (`--api chat`). The reply's number (`extract_gsm8k_answer`) must
equal the reference after normalisation. Questions are the first `--num-questions`, or a sample drawn with
`--seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nextserve.eval.client import EvalItem, add_eval_arguments, read_jsonl, run_eval, select, tool_main
from nextserve.eval.extract import extract_gsm8k_answer, gsm8k_gold

# The next example starts with "Question:"; stopping there keeps a completions reply to one answer.
STOP = ["Question:"]


def build_prompt(question: str, shots: list[dict[str, str]], api: str) -> str | list[dict[str, str]]:
    """The few-shot prompt for one question: one text for completions, alternating turns for chat."""
    if api == "chat":
        turns = []
        for shot in shots:
            turns.append({"role": "user", "content": f"Question: {shot['question']}"})
            turns.append({"role": "assistant", "content": shot["answer"]})
        turns.append({"role": "user", "content": f"Question: {question}"})
        return turns
    examples = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{examples}Question: {question}\nAnswer:"


def load_items(data: str, num_questions: int | None, num_shots: int, api: str, seed: int | None) -> list[EvalItem]:
    """The selected test questions with their prompts and reference answers."""
    test_path = Path(data)
    if num_shots < 0:
        raise ValueError(f"--num-shots must be >= 0, got {num_shots}")
    shots: list[dict[str, str]] = []
    if num_shots:
        train = read_jsonl(test_path.parent / "train.jsonl")
        if len(train) < num_shots:
            raise ValueError(
                f"{test_path.parent / 'train.jsonl'} has {len(train)} records, fewer than {num_shots} shots"
            )
        shots = train[:num_shots]
    items = []
    for record in select(read_jsonl(test_path), num_questions, seed):
        if "question" not in record or "answer" not in record:
            raise ValueError(f"{test_path}: each record needs 'question' and 'answer', got keys {sorted(record)}")
        items.append(EvalItem(build_prompt(record["question"], shots, api), gsm8k_gold(record["answer"])))
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nextserve eval gsm8k`."""
    parser.add_argument("--data", required=True, help="GSM8K test.jsonl; train.jsonl beside it gives the shots")
    parser.add_argument("--num-questions", type=int, default=None, help="questions to ask (default: all)")
    add_eval_arguments(parser, default_max_tokens=512)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; exit code 0, or 1 when some requests failed."""
    items = load_items(args.data, args.num_questions, args.num_shots, args.api, args.seed)
    config = {"num_shots": args.num_shots, "data": str(args.data), "seed": args.seed}
    return run_eval(args, "gsm8k", items, extract_gsm8k_answer, STOP, config)


def main(argv: list[str] | None = None) -> int:
    return tool_main("nextserve eval gsm8k", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
