"""Command line: `nextserve {serve, generate, bench, eval}` (also `python -m nextserve`).

Each subcommand's module owns its flags (`add_arguments`) and its work (`run`); this file only wires them, and
imports a subcommand's module only when it runs, so `nextserve eval ...` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command path, module, help)
_COMMANDS = [
    (("serve",), "nextserve.server.serve", "OpenAI-compatible HTTP server"),
    (("generate",), "nextserve.generate", "offline generation from the command line"),
    (
        ("bench", "serve"),
        "nextserve.bench.serve",
        "serving load generator against an OpenAI-compatible server",
    ),
    (("bench", "offline"), "nextserve.bench.offline", "batched vs one-at-a-time offline generation throughput"),
    (("bench", "prefix"), "nextserve.bench.prefix", "time to first token with prefix caching on vs off"),
    (("bench", "model"), "nextserve.bench.model", "model decode/prefill throughput against a roofline"),
    (("bench", "config"), "nextserve.bench.config", "write a preset geometry as config.json (for dummy weights)"),
    (("bench", "allreduce"), "nextserve.bench.allreduce", "all-reduce latency per message size per backend"),
    (("bench", "fp8-accuracy"), "nextserve.bench.fp8_accuracy", "FP8 against the unquantised model, teacher-forced"),
    (("eval", "gsm8k"), "nextserve.eval.gsm8k", "GSM8K few-shot accuracy against a server"),
    (("eval", "mmlu"), "nextserve.eval.mmlu", "MMLU few-shot accuracy against a server"),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextserve", description="Serve Qwen3-Next models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_ in _COMMANDS:
        parent = sub
        if len(path) == 2:
            if path[0] not in groups:
                p = sub.add_parser(path[0], help=f"{path[0]} tools")
                groups[path[0]] = p.add_subparsers(dest="subcommand", metavar="TOOL")
            parent = groups[path[0]]
        p = parent.add_parser(path[-1], help=help_, description=help_)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported to add its flags.
        if list(path) == argv[: len(path)]:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_module"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper() if hasattr(args, "log_level") else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # User errors (bad flags, bad model folder) get one line, not a traceback.
        print(f"nextserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
