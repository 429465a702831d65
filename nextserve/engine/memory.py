"""Capacity planning: how many state slots and KV pages fit the memory budget (SGLang's semantics).

Budget: on a GPU, `mem_fraction_static` x total memory minus what the weights already take; on a CPU,
`cpu_cache_bytes`. The budget is split between state slots and KV pages so that state / KV =
`mamba_full_memory_ratio`, unless `max_mamba_cache_size` fixes the slot count (then KV gets the rest). More slots
than `max_running_requests` would never be used, so the slot count is capped there and the rest goes to KV.
With prefix caching, `prefix_snapshot_share` of the state memory holds snapshots (or `max_prefix_snapshots`; with
`max_mamba_cache_size`, as many snapshot slots as working slots).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from nextserve.config import EngineConfig
from nextserve.engine.kv_pool import KVLayout
from nextserve.engine.state_pool import StateLayout
from nextserve.model_config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 256


@dataclass(frozen=True)
class Capacity:
    num_slots: int  # working slots (one per running sequence)
    num_snapshot_slots: int  # prefix-cache snapshots
    num_scratch_slots: int  # speculative verification: states after each draft position
    num_pages: int
    page_size: int
    max_running: int
    context_length: int
    slot_bytes: int
    page_bytes: int
    snapshot_interval: int  # prefix-cache grid

    @property
    def max_cached_tokens(self) -> int:
        return self.num_pages * self.page_size

    def describe(self) -> str:
        return (
            f"state slots {self.num_slots} + {self.num_snapshot_slots} for prefix snapshots "
            f"+ {self.num_scratch_slots} for speculative verification "
            f"({self.slot_bytes / 2**20:.2f} MiB each), "
            f"KV pages {self.num_pages} x {self.page_size} tokens ({self.page_bytes / 2**10:.1f} KiB each), "
            f"max tokens in cache {self.max_cached_tokens}, max running requests {self.max_running}, "
            f"context length {self.context_length}, prefix snapshot every {self.snapshot_interval} tokens"
        )


def cache_budget_bytes(cfg: EngineConfig, device: torch.device, weight_bytes: int) -> int:
    """GPU: `mem_fraction_static` of the card minus the weights, but never more than is free now (after the weights
    loaded): memory another engine or process holds is not counted on. CPU: `cpu_cache_bytes`."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cfg.mem_fraction_static) - weight_bytes
        if budget <= 0:
            raise ValueError(
                f"the weights take {weight_bytes / 2**30:.1f} GiB, more than --mem-fraction-static "
                f"{cfg.mem_fraction_static} of {total / 2**30:.1f} GiB leaves for caches"
            )
        chosen = min(budget, free)
        logger.info(
            "cache budget %.2f GiB: the smaller of --mem-fraction-static %.2f x %.1f GiB - %.2f GiB of weights and "
            "the %.2f GiB free now",
            chosen / 2**30, cfg.mem_fraction_static, total / 2**30, weight_bytes / 2**30, free / 2**30,
        )  # fmt: skip
        return chosen
    return cfg.cpu_cache_bytes


def plan_capacity(mc: ModelConfig, cfg: EngineConfig, budget: int, kv: KVLayout, state: StateLayout) -> Capacity:
    slot_bytes, page_bytes = state.slot_bytes, kv.page_bytes
    share = cfg.prefix_snapshot_share if cfg.prefix_caching else 0.0
    if cfg.max_mamba_cache_size is not None:
        slots = cfg.max_mamba_cache_size
        snapshots = slots if cfg.prefix_caching else 0
    else:
        r = cfg.mamba_full_memory_ratio
        total = int(budget * r / (1 + r)) // max(slot_bytes, 1)
        snapshots = int(total * share)
        slots = total - snapshots
    if cfg.max_prefix_snapshots is not None and cfg.prefix_caching:
        snapshots = cfg.max_prefix_snapshots
    max_running = cfg.max_running_requests or min(max(slots, 1), DEFAULT_MAX_RUNNING)
    slots = max(1, min(slots, max_running))
    # Every running sequence holds a working slot: no more can run than there are slots.
    max_running = min(max_running, slots)
    scratch = cfg.speculative_num_steps * slots if cfg.speculative else 0
    if cfg.num_kv_pages is not None:
        pages = cfg.num_kv_pages
    else:
        pages = (budget - (slots + snapshots + scratch) * slot_bytes) // page_bytes
    if pages < 1:
        raise ValueError(
            f"the cache budget ({budget / 2**20:.1f} MiB) holds no KV page after {slots} state slots of "
            f"{slot_bytes / 2**20:.2f} MiB; raise the budget or lower --max-mamba-cache-size"
        )
    context = cfg.context_length or mc.max_position_embeddings
    if context > pages * cfg.page_size:
        logger.warning("context length %d exceeds the KV pool (%d tokens): capping it", context, pages * cfg.page_size)
        context = pages * cfg.page_size
    interval = cfg.prefix_snapshot_interval or auto_snapshot_interval(slot_bytes, page_bytes, cfg.page_size)
    return Capacity(
        slots, snapshots, scratch, int(pages), cfg.page_size, max_running, context, slot_bytes, page_bytes, interval
    )


def auto_snapshot_interval(slot_bytes: int, page_bytes: int, page_size: int) -> int:
    """The grid spacing at which one snapshot costs as much memory as the KV of the tokens it covers (Qwen3-Next
    80B in bf16: 74 MiB of state vs 24 KiB of KV per token -> ~3,100 tokens), on a multiple of the GDN chunk (64)
    and the page size, within [256, 4096]. Ends of prompts, of requests and branch points get snapshots anyway,
    so the grid only serves prefixes that are shared before anyone finished them."""
    unit = math.lcm(64, page_size)
    tokens = slot_bytes / (page_bytes / page_size)
    return int(min(max(math.ceil(tokens / unit) * unit, 256 // unit * unit or unit), 4096 // unit * unit or unit))


def weight_bytes(mc: ModelConfig, dtype: torch.dtype, with_mtp: bool, quant=None) -> int:
    """Exact bytes of the model's parameters (FP8 weights and their scales where `quant` says), counted on the meta
    device (nothing is allocated)."""
    from nextserve.models.qwen3_next import Qwen3NextForCausalLM

    with torch.device("meta"):
        model = Qwen3NextForCausalLM(mc, dtype=dtype, with_mtp=with_mtp, quant=quant)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_weights_fit(need: int, free: int, total: int, fraction: float, dtype: torch.dtype) -> None:
    """Refuses, with the numbers, a model whose weights cannot fit the GPU before a byte is loaded."""
    limit = min(free, int(total * fraction))
    if need > limit:
        gib = 2**30
        raise ValueError(
            f"the weights need {need / gib:.1f} GiB in {str(dtype).removeprefix('torch.')}, but this GPU has "
            f"{total / gib:.1f} GiB ({free / gib:.1f} GiB free; --mem-fraction-static {fraction} allows "
            f"{limit / gib:.1f} GiB); use an FP8 checkpoint, a larger GPU, or fewer layers for benchmarks "
            "(tensor parallelism is not implemented yet)"
        )
