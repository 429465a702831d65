"""ForwardBatch: the per-step metadata that every layer reads, built once per step by the runner.

A step is one flat varlen batch: the new tokens of B sequences laid end to end (T tokens in all, no padding).
Sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1]; `cached_lens[b]` tokens of it are already in the caches
(KV pages and recurrent state), so its new tokens sit at positions cached_lens[b] .. cached_lens[b]+query_lens[b]-1.

Legend: T tokens in the step, B sequences, P pages per sequence (page-table width).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (or tensor) on `device`. On CUDA the copy goes through pinned memory and does not block the host:
    a copy from pageable memory would wait for every kernel queued before it, which an overlapped step must not."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def take_rows(src: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """src[rows]: a slice when rows are 0..n-1 (no index list to copy to the device), else one gather."""
    if rows == list(range(len(rows))):
        return src[: len(rows)]
    return src[to_device(rows, torch.int64, src.device)]


def put_rows(dst: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """dst[rows] = values: a slice copy when rows are 0..n-1, else one scatter."""
    if rows == list(range(len(rows))):
        dst[: len(rows)].copy_(values)
    else:
        dst[to_device(rows, torch.int64, dst.device)] = values


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, absolute position of each token
    cu_seqlens: torch.Tensor  # [B+1] int32, token offsets of each sequence in the step
    cached_lens_t: torch.Tensor  # [B] int32, tokens already cached per sequence
    state_slots: torch.Tensor  # [B] int64, recurrent-state slot of each sequence
    page_table: torch.Tensor  # [B, P] int32, KV pages of each sequence in order
    slot_mapping: torch.Tensor  # [T] int64, flat KV index (page * page_size + offset) each new token writes
    logits_indices: torch.Tensor  # [R] int64, rows of the step whose logits are wanted
    page_size: int
    # Host copies, so that CPU reference ops can loop without device syncs.
    query_lens: list[int]
    cached_lens: list[int]
    # Recurrent-state snapshots to take inside the step: (sequence b, tokens of b's chunk consumed, dst slot).
    # The Gated DeltaNet layers write the state (conv window and SSM state) at that point into the dst slot.
    snapshots: list[tuple[int, int, int]] = field(default_factory=list)
    # Values ops derive from the host lists once per step and every layer reuses (see `memo`).
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key, build):
        """build() on the first call with this key, the same object after: e.g. device copies of per-step metadata,
        which would otherwise be copied again by every layer (and a copy from pageable memory stalls the stream)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def snapshots_of(self, b: int) -> list[tuple[int, int]]:
        """(offset, dst slot) of sequence b's snapshots, by offset."""
        return sorted((o, dst) for sb, o, dst in self.snapshots if sb == b)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor copied to the batch's device through pinned memory: the copy does not wait for the
        kernels already queued (one from pageable memory does)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the shape the recurrent kernels and CUDA graphs want)."""
        return all(n == 1 for n in self.query_lens)

    @property
    def uniform_len(self) -> int | None:
        """The common number of new tokens when every sequence brings the same (decode: 1; verify: k+1)."""
        n = self.query_lens[0] if self.query_lens else None
        return n if n and all(q == n for q in self.query_lens) else None

    @property
    def context_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.cached_lens, self.query_lens)]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        cached_lens: list[int],
        state_slots: list[int],
        page_tables: list[list[int]],
        page_size: int,
        logits_indices: list[int] | None = None,
        device: torch.device | str = "cpu",
        snapshots: list[tuple[int, int, int]] | None = None,
    ) -> ForwardBatch:
        """Builds the tensors from host lists (the runner's job; also handy in tests).

        By default logits are taken at the last token of every sequence.
        """
        assert len(query_lens) == len(cached_lens) == len(state_slots) == len(page_tables)
        positions, slot_mapping, cu = [], [], [0]
        for q, c, pages in zip(query_lens, cached_lens, page_tables):
            for p in range(c, c + q):
                positions.append(p)
                slot_mapping.append(pages[p // page_size] * page_size + p % page_size)
            cu.append(cu[-1] + q)
        if logits_indices is None:
            logits_indices = [e - 1 for e in cu[1:]]
        width = max((len(p) for p in page_tables), default=0)
        table = [p + [0] * (width - len(p)) for p in page_tables]

        def t(x, dtype):
            return to_device(x, dtype, device)

        return cls(
            positions=t(positions, torch.int64),
            cu_seqlens=t(cu, torch.int32),
            cached_lens_t=t(cached_lens, torch.int32),
            state_slots=t(state_slots, torch.int64),
            page_table=t(table, torch.int32).reshape(len(page_tables), width),
            slot_mapping=t(slot_mapping, torch.int64),
            logits_indices=t(logits_indices, torch.int64),
            page_size=page_size,
            query_lens=list(query_lens),
            cached_lens=list(cached_lens),
            snapshots=list(snapshots or []),
        )
