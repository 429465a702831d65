"""EngineConfig: every engine flag, in one frozen dataclass, validated at the edge.

The CLI adds one `--flag-name` per field (`add_cli_args`), and `LLM(**kwargs)` takes the same names in snake_case.
Flag names and meanings follow SGLang where they exist (`--mem-fraction-static`, `--max-mamba-cache-size`,
`--mamba-full-memory-ratio`, `--context-length`, `--max-running-requests`) and vLLM otherwise
(`--max-num-batched-tokens`). "auto"/None values are resolved once, when the engine starts, and logged.

The other engine's name for the same thing is an alias (field metadata "aliases": `--max-model-len`,
`--gpu-memory-utilization`, `--tensor-parallel-size`...), for the CLI and for `LLM(**kwargs)`; flags that need a
translation (`--speculative-config`, `--compilation-config`, `--rope-scaling`, `--mamba-scheduler-strategy`) live in
`nextserve.foreign_flags`. A hub id as `--model` is resolved to its cached folder (`nextserve.hub`) when the config
is built from the CLI or from keyword arguments.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from nextserve.foreign_flags import FOREIGN_NAMES
from nextserve.foreign_flags import add_cli_args as add_foreign_cli_args
from nextserve.foreign_flags import translate as translate_foreign
from nextserve.hub import resolve_model

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = field(
        default=None,
        metadata={
            "help": "model directory, or a Hugging Face hub id resolved through the local hub cache (default: the "
            "built-in tiny model)",
            "aliases": ("--model-path",),
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "hub revision (branch, tag or commit) when --model is a hub id"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights/activations dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16",
            "choices": _DTYPES,
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "fp8: quantise a bf16 checkpoint to block FP8 (128x128) while loading; FP8 checkpoints are "
            "computed in FP8 without it",
            "choices": ("fp8",),
        },
    )
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto (safetensors), or dummy: random weights for the folder's config.json, nothing read from "
            "disk (benchmarks; a synthetic tokenizer when the folder has none)",
            "choices": ("auto", "safetensors", "dummy"),
        },
    )
    seed: int = field(default=0, metadata={"help": "global seed for unseeded sampling", "aliases": ("--random-seed",)})
    json_model_override_args: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of config.json overrides, e.g. '{\"rope_scaling\": {...}}'",
            "aliases": ("--hf-overrides",),
        },
    )
    context_length: int | None = field(
        default=None,
        metadata={
            "help": "max prompt + output tokens per request (default: the model's max_position_embeddings)",
            "aliases": ("--max-model-len",),
        },
    )
    page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
    max_num_batched_tokens: int = field(default=4096, metadata={"help": "token budget of one engine step"})
    max_running_requests: int | None = field(
        default=None,
        metadata={
            "help": "max sequences in one step (default: the state slots, at most 256)",
            "aliases": ("--max-num-seqs",),
        },
    )
    mem_fraction_static: float = field(
        default=0.85,
        metadata={
            "help": "GPU: fraction of total memory for weights and caches",
            "aliases": ("--gpu-memory-utilization",),
        },
    )
    cpu_cache_bytes: int = field(default=1 << 30, metadata={"help": "CPU: bytes for KV pages and state slots"})
    max_mamba_cache_size: int | None = field(
        default=None, metadata={"help": "fix the number of recurrent-state slots (otherwise from the ratio)"}
    )
    mamba_full_memory_ratio: float = field(default=0.9, metadata={"help": "state-slot memory / KV-page memory"})
    mamba_ssm_dtype: str = field(
        default="float32", metadata={"help": "recurrent state dtype", "choices": ("float32", "bfloat16")}
    )
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "reuse KV pages and state snapshots of earlier requests (radix tree)"}
    )
    disable_radix_cache: bool = field(default=False, metadata={"help": "SGLang's name: turn prefix caching off"})
    prefix_snapshot_interval: int | None = field(
        default=None,
        metadata={
            "help": "take a state snapshot every this many tokens of prefill (a multiple of --page-size; "
            "default: where a snapshot costs as much memory as the KV it covers, in [256, 4096])"
        },
    )
    max_prefix_snapshots: int | None = field(
        default=None, metadata={"help": "state slots for prefix-cache snapshots (default: from the share)"}
    )
    prefix_snapshot_share: float = field(
        default=0.5, metadata={"help": "share of the state-slot memory that holds prefix-cache snapshots"}
    )
    speculative_algorithm: str | None = field(
        default=None,
        metadata={
            "help": "NEXTN (alias MTP): speculative decoding with the model's MTP head",
            "choices": ("NEXTN", "MTP"),
            "aliases": ("--speculative-algo",),
        },
    )
    speculative_num_steps: int = field(default=3, metadata={"help": "max draft tokens per step (MTP steps)"})
    speculative_eagle_topk: int = field(default=1, metadata={"help": "draft branching; only 1 (a chain) is supported"})
    speculative_num_draft_tokens: int | None = field(
        default=None, metadata={"help": "tokens verified per step; with topk 1 it must be num_steps + 1"}
    )
    speculative_adaptive: bool = field(
        default=True,
        metadata={
            "help": "choose the number of drafts per step from batch size and measured "
            "acceptance (--no-speculative-adaptive: always num_steps)"
        },
    )
    debug_check_integrity: bool = field(
        default=False,
        metadata={
            "help": "check, whenever the engine goes idle, that every KV page and state slot is owned exactly once "
            "(free list, running sequence or prefix cache); also on with NEXTSERVE_DEBUG_CHECK_INTEGRITY=1"
        },
    )
    allow_reference_kernels: bool = field(
        default=False,
        metadata={
            "help": "on CUDA, run an op on the torch reference when its fast path (Triton, fla-core) fails to "
            "import, instead of refusing to start"
        },
    )
    disable_overlap_schedule: bool = field(
        default=False,
        metadata={
            "help": "read each step's results before launching the next (default: launch step N+1, then process "
            "step N while the device runs it; outputs are the same)"
        },
    )
    disable_cuda_graph: bool = field(
        default=False,
        metadata={"help": "decode eagerly, without CUDA graphs", "aliases": ("--enforce-eager",)},
    )
    cuda_graph_max_bs: int | None = field(
        default=None, metadata={"help": "largest decode batch in a CUDA graph (default: --max-running-requests)"}
    )
    tp_size: int = field(
        default=1,
        metadata={
            "help": "tensor-parallel ranks: one process per GPU (on a CPU, gloo processes)",
            "aliases": ("--tp", "--tensor-parallel-size", "-tp"),
        },
    )
    nnodes: int = field(default=1, metadata={"help": "machines serving one model (--tp-size ranks split evenly)"})
    node_rank: int = field(default=0, metadata={"help": "this machine's rank among --nnodes"})
    dist_init_addr: str | None = field(
        default=None, metadata={"help": "HOST:PORT of node 0, where the nodes meet (with --nnodes > 1)"}
    )
    dist_backend: str | None = field(
        default=None,
        metadata={
            "help": "collectives between ranks: nccl or gloo (default: nccl on GPUs, gloo on CPUs); gloo with "
            "--device cuda:N runs every rank on that one GPU (a check of the sharded kernels, not a deployment)"
        },
    )
    num_kv_pages: int | None = field(default=None, metadata={"help": "fix the number of KV pages (tests, debugging)"})
    disable_tqdm: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(self.page_size >= 1, "--page-size must be >= 1")
        need(self.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be >= 1")
        need(
            self.max_running_requests is None or self.max_running_requests >= 1,
            "--max-running-requests must be >= 1",
        )
        need(0.0 < self.mem_fraction_static <= 1.0, "--mem-fraction-static must be in (0, 1]")
        need(self.cpu_cache_bytes > 0, "--cpu-cache-bytes must be > 0")
        need(
            self.max_mamba_cache_size is None or self.max_mamba_cache_size >= 1,
            "--max-mamba-cache-size must be >= 1",
        )
        need(self.mamba_full_memory_ratio > 0, "--mamba-full-memory-ratio must be > 0")
        need(self.num_kv_pages is None or self.num_kv_pages >= 1, "--num-kv-pages must be >= 1")
        need(self.cuda_graph_max_bs is None or self.cuda_graph_max_bs >= 1, "--cuda-graph-max-bs must be >= 1")
        need(
            self.prefix_snapshot_interval is None
            or (
                self.prefix_snapshot_interval >= self.page_size and self.prefix_snapshot_interval % self.page_size == 0
            ),
            "--prefix-snapshot-interval must be a positive multiple of --page-size",
        )
        need(self.max_prefix_snapshots is None or self.max_prefix_snapshots >= 0, "--max-prefix-snapshots must be >= 0")
        need(0.0 <= self.prefix_snapshot_share < 1.0, "--prefix-snapshot-share must be in [0, 1)")
        need(self.speculative_algorithm in (None, "NEXTN", "MTP"), "--speculative-algorithm must be NEXTN or MTP")
        need(1 <= self.speculative_num_steps <= 8, "--speculative-num-steps must be in [1, 8]")
        need(self.speculative_eagle_topk == 1, "--speculative-eagle-topk: only 1 (chain drafting) is supported")
        need(
            self.speculative_num_draft_tokens in (None, self.speculative_num_steps + 1),
            "--speculative-num-draft-tokens must be --speculative-num-steps + 1 with topk 1",
        )
        need(self.context_length is None or self.context_length >= 2, "--context-length must be >= 2")
        need(self.tp_size >= 1, "--tp-size must be >= 1")
        need(self.nnodes >= 1 and 0 <= self.node_rank < self.nnodes, "--node-rank must be in [0, --nnodes)")
        need(self.dist_backend in (None, "nccl", "gloo"), "--dist-backend must be nccl or gloo")
        need(self.tp_size % self.nnodes == 0, f"--nnodes {self.nnodes} must divide --tp-size {self.tp_size}")
        need(
            self.nnodes == 1 or self.dist_init_addr is not None,
            "--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, where the nodes meet)",
        )
        need(self.dtype in _DTYPES, f"--dtype must be one of {_DTYPES}")
        need(self.quantization in (None, "fp8"), f"--quantization {self.quantization!r}: only fp8 is supported")
        need(self.load_format in ("auto", "safetensors", "dummy"), "--load-format must be auto, safetensors or dummy")
        need(self.mamba_ssm_dtype in ("float32", "bfloat16"), "--mamba-ssm-dtype must be float32 or bfloat16")
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"--device {self.device!r}: expected auto, cpu or cuda[:N]",
        )
        if self.json_model_override_args is not None:
            self.model_overrides()  # validates the JSON

    @property
    def speculative(self) -> bool:
        return self.speculative_algorithm is not None

    @property
    def prefix_caching(self) -> bool:
        return self.enable_prefix_caching and not self.disable_radix_cache

    def model_overrides(self) -> dict[str, Any]:
        if not self.json_model_override_args:
            return {}
        try:
            d = json.loads(self.json_model_override_args)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-model-override-args is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("--json-model-override-args must be a JSON object")
        return d

    def with_updates(self, **kw) -> EngineConfig:
        return replace(self, **kw)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def aliases(cls) -> dict[str, str]:
        """Other engines' names for our fields, snake_case (max_model_len -> context_length)."""
        return {
            alias.lstrip("-").replace("-", "_"): f.name for f in fields(cls) for alias in f.metadata.get("aliases", ())
        }

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """From LLM-style keyword arguments: field names, their aliases (vLLM's max_model_len...), the foreign
        options of `nextserve.foreign_flags`; a hub id as `model` is resolved to its cached folder."""
        aliases, values, foreign = cls.aliases(), {}, {}
        for key, value in kwargs.items():
            if key in FOREIGN_NAMES:
                foreign[key] = value
                continue
            name = aliases.get(key, key)
            if name in values:
                raise TypeError(f"{key!r} and another name for {name!r} were both given")
            values[name] = value
        unknown = set(values) - cls.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}")
        return cls._build(values, foreign)

    @classmethod
    def _build(cls, values: dict[str, Any], foreign: dict[str, Any]) -> EngineConfig:
        values = translate_foreign(foreign, values, cls.defaults())
        if values.get("model"):
            values["model"] = resolve_model(values["model"], values.get("revision"))
        elif values.get("revision") is not None:
            raise ValueError("--revision needs --model to be a hub id")
        return cls(**values)

    # ---- CLI -----------------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            if f.name in skip:
                continue
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            help_ = f.metadata.get("help", "")
            default = None if f.default is MISSING else f.default
            if f.type in ("bool", bool):
                # Flags on by default can be turned off with --no-<flag>.
                action = argparse.BooleanOptionalAction if default else "store_true"
                group.add_argument(*flags, dest=f.name, action=action, default=default, help=help_)
                continue
            typ = {"int": int, "float": float}.get(_base_type(f.type), str)
            group.add_argument(
                *flags,
                dest=f.name,
                type=typ,
                default=default,
                help=f"{help_} (default: {default})",
                choices=f.metadata.get("choices"),
            )
        add_foreign_cli_args(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        foreign = {name: getattr(args, name) for name in FOREIGN_NAMES if getattr(args, name, None) is not None}
        return cls._build(values, foreign)


def _base_type(t: Any) -> str:
    s = str(t)
    for name in ("int", "float", "str"):
        if s.startswith(name):
            return name
    return "str"
