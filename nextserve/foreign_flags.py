"""SGLang's and vLLM's launch flags that have no field of their own in EngineConfig, translated onto its fields.

Same-meaning names (`--model-path`, `--max-model-len`, `--gpu-memory-utilization`, `--tensor-parallel-size`...) are
plain aliases declared on the EngineConfig fields. The flags here carry a structure (a JSON object) or a policy
name, and `translate` turns them into field values. A value nextserve cannot honour is a ValueError naming the flag,
never silently dropped; a translation that contradicts a field set explicitly to something else is an error too.
The same names work as `LLM(...)` keyword arguments (JSON objects may then be dicts).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

# vLLM's speculative methods that mean "the checkpoint's own MTP head", which is what NEXTN runs.
_MTP_METHODS = ("qwen3_next_mtp", "mtp", "nextn")
# vLLM's cudagraph modes. nextserve captures whole decode steps and runs prefill eagerly: FULL_DECODE_ONLY.
_CUDAGRAPH_MODES = {"FULL_DECODE_ONLY": False, "NONE": True}  # mode -> disable_cuda_graph
_GRAPH_SIZE_KEYS = ("max_cudagraph_capture_size", "cudagraph_capture_sizes")
# SGLang's --mamba-scheduler-strategy -> --prefix-snapshot-interval. no_buffer keeps no state snapshots inside a
# prompt (only at the prompt's last page, branch points and request ends), which a grid too wide to reach gives.
MAMBA_STRATEGIES = ("no_buffer", "extra_buffer")
_NO_GRID_TOKENS = 1 << 31


@dataclass(frozen=True)
class ForeignFlag:
    name: str  # snake_case: the LLM keyword; the flag is --name-with-dashes
    origin: str
    help: str
    kind: str = "json"  # json (an object), choice, or bool
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FOREIGN_FLAGS = (
    ForeignFlag(
        "rope_scaling",
        "vLLM",
        'JSON rope_scaling for config.json, e.g. YaRN \'{"rope_type":"yarn","factor":4.0,'
        '"original_max_position_embeddings":262144}\' (same as --json-model-override-args \'{"rope_scaling":...}\')',
    ),
    ForeignFlag(
        "speculative_config",
        "vLLM",
        'JSON \'{"method":"qwen3_next_mtp","num_speculative_tokens":N}\': --speculative-algorithm NEXTN '
        "--speculative-num-steps N (methods qwen3_next_mtp, mtp, nextn; no separate draft model)",
    ),
    ForeignFlag(
        "compilation_config",
        "vLLM",
        "JSON; cudagraph_mode FULL_DECODE_ONLY (what nextserve does) or NONE (= --disable-cuda-graph); "
        "max_cudagraph_capture_size or cudagraph_capture_sizes (their max) = --cuda-graph-max-bs",
    ),
    ForeignFlag(
        "mamba_scheduler_strategy",
        "SGLang",
        "no_buffer: no recurrent-state snapshots inside a prompt (kept only at its last page, at branch points and "
        "at request ends); extra_buffer: also every --prefix-snapshot-interval tokens of prefill (nextserve's "
        "default)",
        kind="choice",
        choices=MAMBA_STRATEGIES,
    ),
    ForeignFlag(
        "trust_remote_code",
        "SGLang, vLLM",
        "accepted for compatibility; nextserve runs no code from a checkpoint, so there is nothing to trust",
        kind="bool",
    ),
)
FOREIGN_NAMES = frozenset(f.name for f in FOREIGN_FLAGS)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SGLang / vLLM flags, translated onto the engine flags")
    for f in FOREIGN_FLAGS:
        if f.kind == "bool":
            group.add_argument(f.flag, action="store_true", default=None, help=f"({f.origin}) {f.help}")
        else:
            group.add_argument(f.flag, default=None, choices=f.choices, help=f"({f.origin}) {f.help}")


def translate(foreign: dict[str, Any], values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`values` (EngineConfig field values) updated with what the foreign options in `foreign` mean."""
    out = dict(values)

    def field_flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def put(name: str, value: Any, source: str) -> None:
        current = out.get(name, defaults[name])
        if current != defaults[name] and current != value:
            raise ValueError(f"{source} means {field_flag(name)} {value}, but {field_flag(name)} is {current}")
        out[name] = value

    if (rope := foreign.get("rope_scaling")) is not None:
        overrides = json.loads(out.get("json_model_override_args") or "{}")
        rope = _json_object(rope, "--rope-scaling")
        if overrides.get("rope_scaling", rope) != rope:
            raise ValueError("--rope-scaling and --json-model-override-args give different rope_scaling")
        overrides["rope_scaling"] = rope
        out["json_model_override_args"] = json.dumps(overrides)
    if (spec := foreign.get("speculative_config")) is not None:
        spec = _json_object(spec, "--speculative-config")
        if unknown := sorted(set(spec) - {"method", "num_speculative_tokens"}):
            raise ValueError(f"--speculative-config: {unknown} not supported (only method, num_speculative_tokens)")
        if spec.get("method") not in _MTP_METHODS:
            raise ValueError(
                f"--speculative-config method {spec.get('method')!r}: only the model's MTP head is supported "
                f"({', '.join(_MTP_METHODS)})"
            )
        steps = spec.get("num_speculative_tokens", defaults["speculative_num_steps"])
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError("--speculative-config num_speculative_tokens must be an integer >= 1")
        put("speculative_algorithm", "NEXTN", "--speculative-config")
        put("speculative_num_steps", steps, "--speculative-config")
    if (compilation := foreign.get("compilation_config")) is not None:
        compilation = _json_object(compilation, "--compilation-config")
        if unknown := sorted(set(compilation) - {"cudagraph_mode", *_GRAPH_SIZE_KEYS}):
            raise ValueError(
                f"--compilation-config: {unknown} not supported (nextserve does not use torch.compile; it takes "
                f"cudagraph_mode, {', '.join(_GRAPH_SIZE_KEYS)})"
            )
        if "cudagraph_mode" in compilation:
            mode = compilation["cudagraph_mode"]
            if mode not in _CUDAGRAPH_MODES:
                raise ValueError(
                    f"--compilation-config cudagraph_mode {mode!r}: nextserve captures whole decode steps and runs "
                    "prefill eagerly; use FULL_DECODE_ONLY, or NONE for no CUDA graphs"
                )
            put("disable_cuda_graph", _CUDAGRAPH_MODES[mode], f"cudagraph_mode {mode}")
        for key in _GRAPH_SIZE_KEYS:
            if key in compilation:
                sizes = compilation[key]
                sizes = sizes if isinstance(sizes, list) else [sizes]
                if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
                    raise ValueError(f"--compilation-config {key} must hold positive integers")
                put("cuda_graph_max_bs", max(sizes), f"--compilation-config {key}")
    if (strategy := foreign.get("mamba_scheduler_strategy")) is not None:
        if strategy not in MAMBA_STRATEGIES:
            raise ValueError(f"--mamba-scheduler-strategy {strategy!r}: expected one of {MAMBA_STRATEGIES}")
        if strategy == "no_buffer":
            page = out.get("page_size", defaults["page_size"])
            put("prefix_snapshot_interval", _NO_GRID_TOKENS // page * page, "--mamba-scheduler-strategy no_buffer")
    return out


def _json_object(value: Any, flag: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return value
