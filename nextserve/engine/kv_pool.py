"""KVPool: fixed-size pages of K and V for every full-attention layer (the MTP layer's included).

Region table of `k` / `v` ([layers, pages + 1, page_size, Hkv, D]):
  page 0          dummy page: padded slots of CUDA-graph batches write here; never handed out
  pages 1..N      handed out by `allocate`, returned by `free`
A page belongs to exactly one owner at a time (a running sequence now; the prefix tree later).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of one page: K and V of page_size tokens in every full-attention layer."""

    num_layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def page_bytes(self) -> int:
        return 2 * self.num_layers * self.page_size * self.kv_heads * self.head_dim * self.dtype.itemsize


class KVPool:
    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str):
        L = layout
        shape = (L.num_layers, num_pages + 1, L.page_size, L.kv_heads, L.head_dim)
        self.layout = layout
        self.k = torch.zeros(shape, dtype=L.dtype, device=device)
        self.v = torch.zeros(shape, dtype=L.dtype, device=device)
        self.page_size = L.page_size
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages, 0, -1))  # pop() hands out low pages first
        self._used: set[int] = set()  # handed out and not given back: catches double and foreign frees

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise RuntimeError(f"KV page {p} freed but not in use (double free)")
            self._used.remove(p)
        self._free.extend(reversed(pages))

    def copy_page(self, src: int, dst: int) -> None:
        """Copy-on-write of a shared partial page: dst gets src's K and V in every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def free_pages(self) -> list[int]:
        return list(self._free)
