"""StatePool: recurrent state of every Gated DeltaNet layer, one slot per running sequence.

Region table of `conv` ([layers, slots + 1, conv_dim, K-1]) and `ssm` ([layers, slots + 1, Hv, dk, dv]):
  slot 0          dummy slot for CUDA-graph padding; never handed out
  slots 1..N      handed out by `allocate` (zeroed: a new sequence starts from the zero state), returned by `free`;
                  running sequences' working slots and the prefix cache's snapshots come from the same range
  slots N+1..N+S  scratch for speculative verification (states after each draft position), held within a step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StateLayout:
    """Shape of one slot: every GDN layer's conv window [conv_dim, K-1] and SSM state [Hv, dk, dv]."""

    num_layers: int
    conv_dim: int
    conv_width: int
    hv: int
    dk: int
    dv: int
    dtype: torch.dtype
    ssm_dtype: torch.dtype

    @property
    def slot_bytes(self) -> int:
        conv = self.conv_dim * (self.conv_width - 1) * self.dtype.itemsize
        return self.num_layers * (conv + self.hv * self.dk * self.dv * self.ssm_dtype.itemsize)


class StatePool:
    def __init__(self, layout: StateLayout, num_slots: int, device: torch.device | str, num_scratch: int = 0):
        L, total = layout, num_slots + num_scratch + 1
        self.layout = layout
        self.conv = torch.zeros(L.num_layers, total, L.conv_dim, L.conv_width - 1, dtype=L.dtype, device=device)
        self.ssm = torch.zeros(L.num_layers, total, L.hv, L.dk, L.dv, dtype=L.ssm_dtype, device=device)
        self.num_slots = num_slots
        self.num_scratch = num_scratch
        self._free: list[int] = list(range(num_slots, 0, -1))
        self._scratch_free: list[int] = list(range(num_slots + num_scratch, num_slots, -1))
        self._used: set[int] = set()  # working and scratch slots handed out: catches double and foreign frees

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("state pool exhausted")
        slot = self._free.pop()
        self._used.add(slot)
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        self._release(slot, "state slot")
        self._free.append(slot)

    def _release(self, slot: int, what: str) -> None:
        if slot not in self._used:
            raise RuntimeError(f"{what} {slot} freed but not in use (double free)")
        self._used.remove(slot)

    def allocate_scratch(self) -> int:
        """A scratch slot for one step (not zeroed: it is written before it is read)."""
        if not self._scratch_free:
            raise RuntimeError("scratch state slots exhausted")
        slot = self._scratch_free.pop()
        self._used.add(slot)
        return slot

    def free_scratch(self, slots: list[int]) -> None:
        for slot in slots:
            self._release(slot, "scratch slot")
        self._scratch_free.extend(slots)

    @property
    def scratch_in_use(self) -> int:
        return self.num_scratch - len(self._scratch_free)

    def copy_slot(self, src: int, dst: int) -> None:
        """dst gets src's conv window and SSM state in every layer (snapshot in, snapshot out)."""
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]

    def free_slots(self) -> list[int]:
        return list(self._free)
