"""MMLU few-shot accuracy of any OpenAI-compatible server (`nextserve eval mmlu`).

Contract: `--data` is a folder holding `test.jsonl` and `dev.jsonl`, or the test file itself with
`dev.jsonl` beside it; records are {"subject", "question", "choices": [4 strings], "answer": 0..3}. The prompt
is the classic MMLU one: "The following are multiple choice questions (with answers) about <subject>.", then
the first `--num-shots` dev examples of the same subject, each "question\\nA. ..\\nB. ..\\nC. ..\\nD. ..
\\nAnswer: X", then the test question ending in "Answer:". Decoding is greedy; the reply's letter
(`extract_mmlu_letter`) must equal the reference. Subjects are taken in sorted order (the first
`--num-subjects`, or a sample drawn with `--seed`), and within a subject the first
`--num-questions-per-subject` questions in file order.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from nextserve.eval.client import EvalItem, add_eval_arguments, read_jsonl, run_eval, select, tool_main
from nextserve.eval.extract import extract_mmlu_letter

LETTERS = "ABCD"
# For completions the letter is the first thing after "Answer:"; a blank line means the model has moved on
# to a new example. Chat replies end with the turn, and may reason over several paragraphs first.
STOP = {"completions": ["\n\n"], "chat": []}


def _check(record: dict[str, Any], path: Path) -> None:
    missing = {"subject", "question", "choices", "answer"} - set(record)
    if missing:
        raise ValueError(f"{path}: record lacks {sorted(missing)}: {str(record)[:120]}")
    if len(record["choices"]) != 4 or record["answer"] not in range(4):
        raise ValueError(f"{path}: need 4 choices and an answer in 0..3, got {str(record)[:160]}")


def format_question(record: dict[str, Any], with_answer: bool) -> str:
    """One example: the question, its lettered choices and "Answer:" (followed by the letter for shots)."""
    lines = [record["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, record["choices"], strict=True)]
    answer = f" {LETTERS[record['answer']]}" if with_answer else ""
    return "\n".join(lines) + f"\nAnswer:{answer}"


def header(subject: str) -> str:
    """The instruction line naming the subject ("high_school_physics" -> "high school physics")."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def build_prompt(record: dict[str, Any], shots: list[dict[str, Any]], api: str) -> str | list[dict[str, str]]:
    """The few-shot prompt: one text for completions, or user/assistant turns with the header in the first."""
    if api == "chat":
        turns = []
        for i, shot in enumerate(shots):
            prefix = header(record["subject"]) if i == 0 else ""
            turns.append({"role": "user", "content": prefix + format_question(shot, with_answer=False)})
            turns.append({"role": "assistant", "content": LETTERS[shot["answer"]]})
        prefix = "" if shots else header(record["subject"])
        turns.append({"role": "user", "content": prefix + format_question(record, with_answer=False)})
        return turns
    examples = "".join(format_question(shot, with_answer=True) + "\n\n" for shot in shots)
    return header(record["subject"]) + examples + format_question(record, with_answer=False)


def resolve_paths(data: str) -> tuple[Path, Path]:
    """(test.jsonl, dev.jsonl) from a folder or from the test file's path."""
    path = Path(data)
    test = path / "test.jsonl" if path.is_dir() else path
    return test, test.parent / "dev.jsonl"


def load_items(
    data: str,
    num_subjects: int | None,
    per_subject: int | None,
    num_shots: int,
    api: str,
    seed: int | None,
) -> list[EvalItem]:
    """The selected questions, grouped by subject in sorted order, with prompts and reference letters."""
    if num_shots < 0:
        raise ValueError(f"--num-shots must be >= 0, got {num_shots}")
    test_path, dev_path = resolve_paths(data)
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_jsonl(test_path):
        _check(record, test_path)
        by_subject[record["subject"]].append(record)
    dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if num_shots:
        for record in read_jsonl(dev_path):
            _check(record, dev_path)
            dev[record["subject"]].append(record)
    items = []
    for subject in select(sorted(by_subject), num_subjects, seed):
        shots = dev[subject][:num_shots]
        if len(shots) < num_shots:
            raise ValueError(f"{dev_path}: subject {subject!r} has {len(shots)} dev examples, need {num_shots}")
        for record in select(by_subject[subject], per_subject, None):
            items.append(EvalItem(build_prompt(record, shots, api), LETTERS[record["answer"]], subject))
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nextserve eval mmlu`."""
    parser.add_argument("--data", required=True, help="folder with test.jsonl and dev.jsonl, or test.jsonl")
    parser.add_argument("--num-subjects", type=int, default=None, help="subjects to test (default: all 57)")
    parser.add_argument(
        "--num-questions-per-subject", type=int, default=None, help="questions per subject (default: all)"
    )
    add_eval_arguments(parser, default_max_tokens=16)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; exit code 0, or 1 when some requests failed."""
    items = load_items(
        args.data, args.num_subjects, args.num_questions_per_subject, args.num_shots, args.api, args.seed
    )
    config = {"num_shots": args.num_shots, "data": str(args.data), "seed": args.seed}
    return run_eval(args, "mmlu", items, extract_mmlu_letter, STOP[args.api], config)


def main(argv: list[str] | None = None) -> int:
    return tool_main("nextserve eval mmlu", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
