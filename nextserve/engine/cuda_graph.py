"""CUDA graphs of the decode step: the model forward and lm_head for B sequences of one new token each, captured
once per bucket size and replayed with the step's inputs copied into static buffers.

A decode step at batch 1 launches hundreds of small kernels; replaying a graph removes the CPU cost of each launch,
which is most of the step's time at small batches. What makes the step capturable: every op reads its per-step
metadata from device tensors (positions, slots, page table, context lengths) and never syncs with the host, and
the grid of every kernel depends only on the batch size. A step whose batch needs anything else runs eagerly:
prefill chunks, speculative verification, steps that take a state snapshot (the copies are planned on the host),
batches larger than the largest bucket, and fp32 models (the fp32 expert path loops over experts on the host).

Padding: a batch of B sequences replays the smallest bucket >= B. Rows B.. read token 0 at position 0, write their
KV into the dummy page 0 and their recurrent state into the dummy slot 0, whose contents nobody reads.
Legend: B sequences in the step, Bb its bucket, W page-table width (pages of the longest allowed sequence).
"""

from __future__ import annotations

import logging

import torch

from nextserve.forward_batch import ForwardBatch, put_rows
from nextserve.models.qwen3_next import Qwen3NextForCausalLM

logger = logging.getLogger(__name__)

DUMMY_SLOT = 0
DUMMY_PAGE = 0


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch (and max_batch itself): padding stays under 8 rows,
    which matters because every padded token routes to experts whose weights the step then reads."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def supports_graphs(model: Qwen3NextForCausalLM, device: torch.device) -> str | None:
    """None when decode steps can be captured on this device, else the reason why not."""
    if device.type != "cuda":
        return "not a CUDA device"
    if model.dtype not in (torch.bfloat16, torch.float16):
        return f"{str(model.dtype).removeprefix('torch.')} weights (the fp32 expert path syncs with the host)"
    return None


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen3NextForCausalLM,
        page_size: int,
        max_pages: int,
        max_batch: int,
        device: torch.device,
        sizes: list[int] | None = None,
    ):
        """sizes: the buckets to capture (default `bucket_sizes(max_batch)`; `nextserve bench model` captures one)."""
        self.model, self.page_size, self.device = model, page_size, device
        self.sizes = sorted(sizes) if sizes else bucket_sizes(max_batch)
        self.max_batch, self.width = self.sizes[-1], max_pages
        Bm, W = self.max_batch, max_pages
        # Device buffers the graphs read, and pinned host twins the step fills (one copy per buffer per step).
        self.ints = torch.zeros(4, Bm, dtype=torch.int64, device=device)  # ids, positions, slots, slot_mapping
        self._copied: torch.cuda.Event | None = None  # the last run's host-to-device copies are done
        self.cached = torch.zeros(Bm, dtype=torch.int32, device=device)
        self.table = torch.zeros(Bm, W, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.host_ints = torch.zeros(4, Bm, dtype=torch.int64, pin_memory=pin)
        self.host_cached = torch.zeros(Bm, dtype=torch.int32, pin_memory=pin)
        self.host_table = torch.zeros(Bm, W, dtype=torch.int32, pin_memory=pin)
        self.cu = torch.arange(Bm + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(Bm, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch_of(self, Bb: int) -> ForwardBatch:
        """The ForwardBatch a bucket's graph reads: views of the static buffers. The host lists only tell the ops
        that this is a decode step (one token each, nothing cached needs host values)."""
        return ForwardBatch(
            positions=self.ints[1, :Bb],
            cu_seqlens=self.cu[: Bb + 1],
            cached_lens_t=self.cached[:Bb],
            state_slots=self.ints[2, :Bb],
            page_table=self.table[:Bb],
            slot_mapping=self.ints[3, :Bb],
            logits_indices=self.rows[:Bb],
            page_size=self.page_size,
            query_lens=[1] * Bb,
            cached_lens=[0] * Bb,
        )

    def _forward(self, Bb: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.ints[0, :Bb], self.batch_of(Bb))
        return hidden, self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, all in one memory pool (smaller graphs reuse its blocks)."""
        self._fill_padding(0, self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up outside capture: Triton compiles and autotunes, cuBLAS picks its kernels and workspaces.
            for Bb in reversed(self.sizes):
                self._forward(Bb)
            torch.cuda.synchronize(self.device)
            for Bb in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[Bb] = self._forward(Bb)
                self.graphs[Bb] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int, max_pages: int) -> bool:
        return 0 < num_seqs <= self.max_batch and max_pages <= self.width

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], page_tables: list[list[int]], pending=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of B sequences: token ids[b] at position positions[b] (= tokens cached before it) with
        state slot slots[b] and KV pages page_tables[b]. Returns views (hidden [B, H], fp32 logits [B, V]) of the
        graph's outputs, valid until the next replay."""
        B = len(ids)
        Bb = next(s for s in self.sizes if s >= B)
        ps = self.page_size
        if self._copied is not None:
            # Overlapped steps: the previous step's copies out of these pinned buffers must be done (they run at
            # that step's start on the stream; this waits for them, not for the step).
            self._copied.synchronize()
        ints, table = self.host_ints.numpy(), self.host_table.numpy()
        mapping = [pages[pos // ps] * ps + pos % ps for pos, pages in zip(positions, page_tables)]
        ints[:, :B] = (ids, positions, slots, mapping)
        width = 1
        for b, pages in enumerate(page_tables):
            table[b, : len(pages)] = pages  # numpy converts the list in C; torch element writes would cost ~us each
            width = max(width, len(pages))
        self.host_cached.numpy()[:B] = positions
        self._fill_padding(B, Bb)
        # Non-blocking copies from pinned memory: the step ends by reading sampled tokens back, which waits for the
        # stream, so the host buffers are free again by the next step.
        self.ints[:, :Bb].copy_(self.host_ints[:, :Bb], non_blocking=True)
        self.cached[:Bb].copy_(self.host_cached[:Bb], non_blocking=True)
        self.table[:Bb, :width].copy_(self.host_table[:Bb, :width], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        if pending is not None:
            put_rows(self.ints[0], *pending)  # tokens the host has not read yet: from the device, after the copy
        self.graphs[Bb].replay()
        hidden, logits = self.outputs[Bb]
        return hidden[:B], logits[:B]

    def _fill_padding(self, lo: int, hi: int) -> None:
        self.host_ints[:, lo:hi] = 0  # token 0 at position 0, dummy slot, KV into the dummy page's first entry
        self.host_cached[lo:hi] = 0
        self.host_table[lo:hi, 0] = DUMMY_PAGE
        if lo == 0:
            self.ints[:, :hi].zero_()
            self.cached[:hi].zero_()
            self.table[:hi].zero_()
