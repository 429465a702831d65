"""Triton path for `nextserve.ops.conv1d.causal_conv1d` (same contract: varlen x [T, C], weight [C, K], slot pool
conv_states [S, C, K-1], SiLU output in x's dtype, snapshots at their offsets).

Prefill is two launches: the convolution (each program a tile of one sequence's tokens by channels, reading the
left context from the sequence's slot), then the windows (the final one per sequence and every snapshot), gathered
into a small buffer and scattered to their slots. Writing windows in a second pass keeps the first pass free of
read-after-write hazards on the slot it reads. Decode is one launch that convolves and shifts each window in place.

Arithmetic is fp32. Legend: T tokens, C channels, K kernel width, B sequences, R windows written, S slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nextserve.forward_batch import ForwardBatch

_BT, _BC, _WARPS = 32, 128, 4  # prefill tile (tokens x channels) and warps per program


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_states: torch.Tensor,
    batch: ForwardBatch,
    parts: list[int] | None = None,
    columns: torch.Tensor | None = None,
    column_run: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Same contract as `nextserve.ops.conv1d.causal_conv1d`, on CUDA tensors. column_run: see there."""
    assert conv_states.is_contiguous(), "the slot pool is indexed by raw offsets"
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    if batch.is_decode:
        y = _decode(x, weight, conv_states, batch.state_slots, columns)
        if batch.snapshots:  # offset 1: the window after the step
            src = batch.state_slots[batch.to_device(torch.tensor([b for b, _, _ in batch.snapshots]))]
            dst = batch.to_device(torch.tensor([d for _, _, d in batch.snapshots]))
            conv_states.index_copy_(0, dst, conv_states.index_select(0, src))
        return y if parts is None else list(y.split(parts, dim=-1))  # decode kernels read strided rows
    return _prefill(x, weight, conv_states, batch, parts, columns, column_run)


@triton.jit
def _conv_kernel(
    x_ptr,
    col_ptr,
    w_ptr,
    state_ptr,
    out_ptr,
    cu_ptr,
    slot_ptr,
    stride_x,
    C,
    T,
    P1,
    P2,
    K: tl.constexpr,
    HAS_COLS: tl.constexpr,
    COL_RUNS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    i_t = tl.program_id(0)
    b = tl.program_id(1)
    i_c = tl.program_id(2)
    start = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    if i_t * BT >= n:  # the grid is sized for the longest sequence
        return
    slot = tl.load(slot_ptr + b).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)  # token index inside the sequence
    c = i_c * BC + tl.arange(0, BC)
    mt = t < n
    mc = c < C
    if COL_RUNS:  # the map is contiguous over each tile (runs of BC from 16-aligned starts): vectorised loads
        xc = tl.multiple_of(tl.load(col_ptr + i_c * BC), 16) + tl.arange(0, BC)
    elif HAS_COLS:
        xc = tl.load(col_ptr + c, mask=mc, other=0)  # the column of x feeding each channel: gathers
    else:
        xc = c  # known contiguous: the loads vectorise
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        # Tap j reads input t + j - (K-1); inputs before the chunk (index < 0) come from the window below.
        idx = t + j - (K - 1)
        m = (mt & (idx >= 0))[:, None] & mc[None, :]
        xv = tl.load(x_ptr + (start + idx)[:, None] * stride_x + xc[None, :], mask=m, other=0.0)
        w = tl.load(w_ptr + c * K + j, mask=mc, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * w[None, :]
    if i_t == 0:
        # Only the first tile sees the saved window (kept out of the other tiles: its loads are strided and
        # would double their instruction count). Window position p is input p-(K-1): through tap j it feeds
        # output row p - j.
        for p in tl.static_range(K - 1):
            sp = tl.load(state_ptr + (slot * C + c) * (K - 1) + p, mask=mc, other=0.0).to(tl.float32)
            for j in tl.static_range(p + 1):
                w = tl.load(w_ptr + c * K + j, mask=mc, other=0.0).to(tl.float32)
                acc += tl.where((t == p - j)[:, None], (w * sp)[None, :], 0.0)
    y = acc / (1.0 + tl.exp(-acc))  # SiLU
    # Channel c lands in part [0, P1), [P1, P2) or [P2, C), each part a row-major [T, width] block.
    lo = tl.where(c < P1, 0, tl.where(c < P2, P1, P2)).to(tl.int64)
    width = tl.where(c < P1, P1, tl.where(c < P2, P2 - P1, C - P2)).to(tl.int64)
    dst = T * lo[None, :] + (start + t)[:, None] * width[None, :] + (c - lo)[None, :]
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])


@triton.jit
def _window_kernel(
    x_ptr,
    col_ptr,
    state_ptr,
    buf_ptr,
    start_ptr,
    src_ptr,
    off_ptr,
    stride_x,
    C,
    K: tl.constexpr,
    HAS_COLS: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
):
    # Window r = inputs off-(K-1) .. off-1 of its sequence (index < 0: the slot's saved window), as [C, K-1].
    r = tl.program_id(0)
    i_c = tl.program_id(1)
    start = tl.load(start_ptr + r).to(tl.int64)
    slot = tl.load(src_ptr + r).to(tl.int64)
    off = tl.load(off_ptr + r).to(tl.int64)
    c = i_c * BC + tl.arange(0, BC)
    i = tl.arange(0, BK)
    mc = c < C
    mi = i < K - 1
    idx = off - (K - 1) + i
    from_x = mc[:, None] & (mi & (idx >= 0))[None, :]
    from_s = mc[:, None] & (mi & (idx < 0))[None, :]
    if HAS_COLS:
        xc = tl.load(col_ptr + c, mask=mc, other=0)
    else:
        xc = c
    xv = tl.load(x_ptr + (start + idx)[None, :] * stride_x + xc[:, None], mask=from_x, other=0.0)
    sv = tl.load(state_ptr + (slot * C + c[:, None]) * (K - 1) + (idx + K - 1)[None, :], mask=from_s, other=0.0)
    win = xv.to(tl.float32) + sv.to(tl.float32)
    tl.store(
        buf_ptr + (r * C + c[:, None]) * (K - 1) + i[None, :], win.to(buf_ptr.dtype.element_ty), mask=from_x | from_s
    )


def _prefill(x, weight, conv_states, batch: ForwardBatch, parts, columns, column_run) -> torch.Tensor | list:
    T, C = x.shape[0], weight.shape[0]
    K = weight.shape[1]
    dev = x.device
    # Output parts laid end to end, each [T, part] row-major: part p of token t starts at T*lo_p + t*width_p.
    # Up to three parts (the GDN's q | k | v); one part is the plain [T, C] layout.
    split = parts is not None
    parts = list(parts or [C])
    assert sum(parts) == C and len(parts) <= 3, "parts must split the channels into at most three"
    bounds = [sum(parts[:i]) for i in range(1, len(parts))] + [C] * (3 - len(parts))
    out = torch.empty(T * C, dtype=x.dtype, device=dev)
    lo = 0
    views = []
    for p in parts:
        views.append(out[T * lo : T * (lo + p)].view(T, p))
        lo += p
    result = views if split else views[0]
    B = batch.num_seqs
    max_n = max(batch.query_lens, default=0)
    if B == 0 or max_n == 0:
        return result
    grid = (triton.cdiv(max_n, _BT), B, triton.cdiv(C, _BC))
    cols = x if columns is None else columns  # never read without a column map
    _conv_kernel[grid](
        x,
        cols,
        weight,
        conv_states,
        out,
        batch.cu_seqlens,
        batch.state_slots,
        x.stride(0),
        C,
        T,
        bounds[0],
        bounds[1],
        K=K,
        HAS_COLS=columns is not None,
        COL_RUNS=columns is not None and column_run is not None and column_run % _BC == 0 and C % _BC == 0,
        BT=_BT,
        BC=_BC,
        num_warps=_WARPS,
    )
    # Windows to write: each sequence's final one (offset n) into its own slot, then the snapshots.
    starts = [0]
    for n in batch.query_lens:
        starts.append(starts[-1] + n)
    seqs = list(range(B)) + [b for b, _, _ in batch.snapshots]
    offs = list(batch.query_lens) + [o for _, o, _ in batch.snapshots]
    assert all(0 <= o <= batch.query_lens[b] for b, o in zip(seqs, offs)), "snapshot offset outside the chunk"

    def window_meta():
        # Rows: start of the sequence in the step, offset of the window's end, sequence, destination slot (-1: its
        # own slot). Built once per step; every GDN layer reads the same.
        dsts = [-1] * B + [d for _, _, d in batch.snapshots]
        return batch.to_device(torch.tensor([[starts[b] for b in seqs], offs, seqs, dsts], dtype=torch.int64))

    host = batch.memo("conv_windows", window_meta)
    src = batch.state_slots.index_select(0, host[2])
    dst = torch.where(host[3] < 0, src, host[3])
    buf = torch.empty(len(seqs), C, K - 1, dtype=conv_states.dtype, device=dev)
    bc = 64
    _window_kernel[(len(seqs), triton.cdiv(C, bc))](
        x,
        cols,
        conv_states,
        buf,
        host[0],
        src,
        host[1],
        x.stride(0),
        C,
        K=K,
        HAS_COLS=columns is not None,
        BK=triton.next_power_of_2(K - 1),
        BC=bc,
    )
    conv_states.index_copy_(0, dst, buf)
    return result


@triton.jit
def _decode_kernel(
    x_ptr,
    col_ptr,
    w_ptr,
    state_ptr,
    out_ptr,
    slot_ptr,
    stride_x,
    C,
    K: tl.constexpr,
    HAS_COLS: tl.constexpr,
    BC: tl.constexpr,
):
    # One program: one sequence, BC channels. It loads its whole window before storing the shifted one, and no
    # other program touches those (slot, channel) cells, so the in-place update is race-free.
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    slot = tl.load(slot_ptr + b).to(tl.int64)
    p_s = state_ptr + (slot * C + c) * (K - 1)
    if HAS_COLS:
        xv = tl.load(x_ptr + b * stride_x + tl.load(col_ptr + c, mask=mc, other=0), mask=mc, other=0.0)
    else:
        xv = tl.load(x_ptr + b * stride_x + c, mask=mc, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * K + (K - 1), mask=mc, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        s = tl.load(p_s + j, mask=mc, other=0.0)
        acc += s.to(tl.float32) * tl.load(w_ptr + c * K + j, mask=mc, other=0.0).to(tl.float32)
    # Shift: window[j] = window[j+1], newest input last.
    for j in tl.static_range(K - 2):
        s = tl.load(p_s + j + 1, mask=mc, other=0.0)
        tl.store(p_s + j, s, mask=mc)
    tl.store(p_s + (K - 2), xv.to(state_ptr.dtype.element_ty), mask=mc)
    y = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b * C + c, y.to(out_ptr.dtype.element_ty), mask=mc)


def _decode(x, weight, conv_states, slots: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    B, C = x.shape[0], weight.shape[0]
    K = weight.shape[1]
    out = torch.empty(B, C, dtype=x.dtype, device=x.device)
    if B:
        bc = 256
        _decode_kernel[(B, triton.cdiv(C, bc))](
            x,
            x if columns is None else columns,
            weight,
            conv_states,
            out,
            slots,
            x.stride(0),
            C,
            K=K,
            HAS_COLS=columns is not None,
            BC=bc,
        )
    return out
