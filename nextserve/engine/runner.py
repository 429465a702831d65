"""ModelRunner: owns the model and the cache pools on one device, and runs one scheduled step.

It turns the scheduler's decision into the step's flat input ids and ForwardBatch, runs the model, and returns
the logits of the sequences that sample this step (in scheduled order). It knows nothing about requests,
sampling or text.
"""

from __future__ import annotations

import torch

from nextserve.engine.cuda_graph import DecodeGraphs
from nextserve.engine.kv_pool import KVPool
from nextserve.engine.scheduler import ScheduledSeq
from nextserve.engine.state_pool import StatePool
from nextserve.forward_batch import ForwardBatch, put_rows, to_device
from nextserve.models.qwen3_next import Qwen3NextForCausalLM


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, kv_pool: KVPool, state_pool: StatePool, device: torch.device):
        self.model = model
        self.kv = kv_pool
        self.states = state_pool
        self.device = device
        self.graphs: DecodeGraphs | None = None
        self.bind_caches()

    def enable_cuda_graphs(self, max_batch: int, max_pages: int) -> None:
        """Captures decode graphs for batches up to max_batch whose page tables hold up to max_pages pages."""
        self.graphs = DecodeGraphs(self.model, self.kv.page_size, max_pages, max_batch, self.device)
        self.graphs.capture()

    def close(self) -> None:
        """Drops the CUDA graphs and the layers' views of the pools (what would keep the pools alive)."""
        self.graphs = None
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        for gdn in self.model.linear_attention_layers():
            gdn.conv_state = gdn.ssm_state = None

    def bind_caches(self) -> None:
        """Gives every layer its views of the pools, once: layer i of a kind gets index i of that pool."""
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv.k[i], self.kv.v[i]
        for i, gdn in enumerate(self.model.linear_attention_layers()):
            gdn.conv_state, gdn.ssm_state = self.states.conv[i], self.states.ssm[i]

    def prepare(self, scheduled: list[ScheduledSeq], snapshots=(), pending=None) -> tuple[torch.Tensor, ForwardBatch]:
        ids: list[int] = []
        logits_rows: list[int] = []
        for s in scheduled:
            start = len(ids)
            ids += s.input_ids
            if s.draft:
                logits_rows += range(start, len(ids))  # a verify row group: logits at every position
            elif s.samples:
                logits_rows.append(len(ids) - 1)
        batch = ForwardBatch.build(
            query_lens=[s.num_tokens for s in scheduled],
            cached_lens=[s.seq.num_cached for s in scheduled],
            state_slots=[s.seq.slot for s in scheduled],
            page_tables=[s.seq.pages for s in scheduled],
            page_size=self.kv.page_size,
            logits_indices=logits_rows,
            device=self.device,
            snapshots=list(snapshots),
        )
        input_ids = to_device(ids, torch.int64, self.device)
        if pending is not None:
            put_rows(input_ids, *pending)
        return input_ids, batch

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], snapshots=(), pending=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the step; returns (hidden [T, H], fp32 logits [R, V] of the rows that sample, in scheduled order;
        every row of a verify group). `snapshots` are (index in scheduled, offset in its chunk, dst slot) state
        snapshots taken inside the step. `pending`: (rows of the flat input, device token values) for tokens the
        host has not read yet (their host value is PENDING)."""
        if self.graphs is not None and not snapshots and self._graphable(scheduled):
            seqs = [s.seq for s in scheduled]
            hidden, logits = self.graphs.run(
                [s.input_ids[0] for s in scheduled],
                [seq.num_cached for seq in seqs],
                [seq.slot for seq in seqs],
                [seq.pages for seq in seqs],
                pending,
            )
            if not all(s.samples for s in scheduled):  # a one-token prefill chunk that does not end its prompt
                logits = logits[to_device([i for i, s in enumerate(scheduled) if s.samples], torch.int64, self.device)]
            return hidden, logits
        input_ids, batch = self.prepare(scheduled, snapshots, pending)
        hidden = self.model(input_ids, batch)
        return hidden, self.model.compute_logits(hidden[batch.logits_indices]).float()

    def _graphable(self, scheduled: list[ScheduledSeq]) -> bool:
        """A decode step the graphs cover: one new token per sequence, no verification, pages within the width."""
        if not self.graphs.can_run(len(scheduled), max(len(s.seq.pages) for s in scheduled)):
            return False
        return all(s.num_tokens == 1 and not s.draft for s in scheduled)
