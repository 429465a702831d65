"""CUDA paths for the gated delta rule behind `nextserve.ops.gdn.gated_delta_rule` (same contract, same slots).

Prefill runs fla's chunked kernel (`fla-core`, optional) over the step's varlen batch: initial states are gathered
from the slot pool, final states written back. A snapshot inside a sequence cuts it there: the pieces run in
successive rounds, each round one varlen fla call that carries the fp32 state of the round before, and only
sequences with snapshots take part in the later rounds.

Decode (one token per sequence) runs a Triton kernel of our own that reads and updates each sequence's state in
the pool in place, by slot index: no gather or scatter copies, and no fla needed.

Importing this module needs Triton (gdn.py treats an ImportError as "no fast path"); fla is looked up here.
Legend: T tokens, B sequences, Hk key heads, Hv value heads, dk / dv head dims, S pool slots, N pieces in a round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nextserve.forward_batch import ForwardBatch

try:  # fla-core is an optional extra (pyproject's `gpu`); without it prefill stays on the torch reference.
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
except Exception as e:  # noqa: BLE001 - any failure to import fla (missing, or broken against this torch) means "absent"
    _fla_chunk = None
    FLA_IMPORT_ERROR: Exception | None = e
else:
    FLA_IMPORT_ERROR = None


_FLA_CHUNK = 64  # fla's chunk size for the gated delta rule (its default; we pass chunk indices built for it)


def can_run(batch: ForwardBatch) -> bool:
    """Whether this module covers the step: decode always, prefill only with fla installed."""
    return batch.is_decode or _fla_chunk is not None


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_states: torch.Tensor,
    batch: ForwardBatch,
) -> torch.Tensor:
    """Same contract as `nextserve.ops.gdn.gated_delta_rule`, on CUDA tensors. Returns o [T, Hv, dv] in v.dtype."""
    assert ssm_states.is_contiguous(), "the slot pool is indexed by raw offsets"
    if batch.is_decode:
        o = _decode(q, k, v, g, beta, ssm_states, batch.state_slots)
        _copy_slots(ssm_states, batch, [(b, dst) for b, _, dst in batch.snapshots])  # offset 1: after the step
        return o
    return _prefill(q, k, v, g, beta, ssm_states, batch)


# ---- prefill: fla chunked kernel over varlen pieces ----


def _prefill(q, k, v, g, beta, ssm_states, batch: ForwardBatch) -> torch.Tensor:
    lens = batch.query_lens
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    # Piece bounds per sequence: 0, every snapshot offset strictly inside, n. Offsets 0 and n need no cut.
    bounds = []
    for b, n in enumerate(lens):
        offs = {o for o, _ in batch.snapshots_of(b)}
        assert all(0 <= o <= n for o in offs), "snapshot offset outside the sequence's chunk"
        bounds.append(sorted({0, n} | {o for o in offs if 0 < o < n}) if n else [0])
    # A snapshot at offset 0 is the initial state: copy it before the slot is overwritten.
    _copy_slots(ssm_states, batch, [(b, dst) for b, o, dst in batch.snapshots if o == 0])

    # fla wants [1, T, H, d] with unit stride on the last dim; g in fp32 (it cumsums it), beta like v.
    q, k, v = (x.contiguous().unsqueeze(0) for x in (q, k, v))
    g, beta = g.float().contiguous().unsqueeze(0), beta.to(v.dtype).contiguous().unsqueeze(0)
    out = torch.empty_like(v[0])
    carry: dict[int, torch.Tensor] = {}  # b -> fp32 state [Hv, dk, dv] after its pieces so far
    rounds = max((len(bd) - 1 for bd in bounds), default=0)
    for r in range(rounds):
        members = [b for b in range(len(lens)) if len(bounds[b]) - 1 > r]
        pieces = [(starts[b] + bounds[b][r], starts[b] + bounds[b][r + 1]) for b in members]
        cu = [0]
        for lo, hi in pieces:
            cu.append(cu[-1] + hi - lo)
        whole = r == 0 and len(members) == len(lens) and cu[-1] == q.shape[1]
        # Device copies of the round's metadata, made by the first GDN layer of the step and reused by the rest.
        meta = batch.memo(("fla", r), lambda p=pieces, c=cu, w=whole: _fla_meta(batch, p, c, w))
        idx, cu_dev, cu_cpu, chunk_indices = meta
        if whole:  # the common case (no cuts): the step's tokens as they are, no gather
            qr, kr, vr, gr, br = q, k, v, g, beta
        else:
            qr, kr, vr, gr, br = (x.index_select(1, idx) for x in (q, k, v, g, beta))
        if r == 0:
            h0 = ssm_states.index_select(0, _slots_of(batch, members))
        else:
            h0 = torch.stack([carry[b] for b in members])
        o, ht = _fla_chunk(
            qr,
            kr,
            vr,
            gr,
            br,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            cu_seqlens=cu_dev,
            cu_seqlens_cpu=cu_cpu,  # lets fla size its chunk grid without a device sync
            chunk_indices=chunk_indices,
        )  # o [1, Tr, Hv, dv], ht [N, Hv, dk, dv] fp32
        if idx is None:
            out = o[0]
        else:
            out.index_copy_(0, idx, o[0])
        for i, b in enumerate(members):
            carry[b] = ht[i]
        ends = {b: bounds[b][r + 1] for b in members}
        _copy_states(ssm_states, [(carry[b], dst) for b, o, dst in batch.snapshots if o > 0 and ends.get(b) == o])
    done = sorted(carry)
    if done:
        final = torch.stack([carry[b] for b in done]).to(ssm_states.dtype)
        ssm_states.index_copy_(0, _slots_of(batch, done), final)
    return out.to(v.dtype)


def _fla_meta(batch: ForwardBatch, pieces: list[tuple[int, int]], cu: list[int], whole: bool):
    """(token gather index or None, cu_seqlens on the device and on the host, fla's chunk index [chunks, 2]:
    (piece, chunk within it) of every 64-token chunk) for one round of pieces."""
    idx = None if whole else batch.to_device(torch.cat([torch.arange(lo, hi) for lo, hi in pieces]))
    cu_cpu = torch.tensor(cu, dtype=torch.int64)
    chunks = [(i, c) for i, (lo, hi) in enumerate(pieces) for c in range(-(-(hi - lo) // _FLA_CHUNK))]
    chunk_indices = torch.tensor(chunks, dtype=torch.int64).view(-1, 2)
    return idx, batch.to_device(cu_cpu), cu_cpu, batch.to_device(chunk_indices)


def _slots_of(batch: ForwardBatch, seqs: list[int]) -> torch.Tensor:
    """Slots of the given sequences, looked up on the device (no sync to read state_slots on the host)."""
    if seqs == list(range(batch.num_seqs)):
        return batch.state_slots
    return batch.state_slots[batch.to_device(torch.tensor(seqs))]


def _copy_slots(pool: torch.Tensor, batch: ForwardBatch, pairs: list[tuple[int, int]]) -> None:
    """pool[dst] = pool[slot of sequence b] for each (b, dst), in one gather and one scatter."""
    if pairs:
        src = _slots_of(batch, [b for b, _ in pairs])
        dst = batch.to_device(torch.tensor([d for _, d in pairs]))
        pool.index_copy_(0, dst, pool.index_select(0, src))


def _copy_states(pool: torch.Tensor, pairs: list[tuple[torch.Tensor, int]]) -> None:
    for state, dst in pairs:
        pool[dst] = state.to(pool.dtype)


# ---- decode: one recurrent step per sequence, state updated in the pool ----

_DECODE_BV, _DECODE_WARPS = 64, 4  # dv slice per program, warps per program (swept on an H100)


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    o_ptr,
    state_ptr,
    slot_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    # One program: one (sequence, value head) and a BV-wide slice of dv; it owns state[slot, h, :, slice].
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    b = i_bh // HV
    h = i_bh % HV
    hk = h // (HV // HK)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < DK
    mv = ov < DV

    qv = tl.load(q_ptr + b * stride_qb + hk * stride_qh + ok, mask=mk, other=0.0).to(tl.float32)
    kv = tl.load(k_ptr + b * stride_kb + hk * stride_kh + ok, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v_ptr + b * stride_vb + h * stride_vh + ov, mask=mv, other=0.0).to(tl.float32)
    gv = tl.load(g_ptr + b * HV + h).to(tl.float32)
    bv = tl.load(beta_ptr + b * HV + h).to(tl.float32)
    # Same L2 norm (eps inside the root) and dk^-0.5 query scale as the reference.
    qv = qv * tl.rsqrt(tl.sum(qv * qv) + 1e-6) * scale
    kv = kv * tl.rsqrt(tl.sum(kv * kv) + 1e-6)

    slot = tl.load(slot_ptr + b).to(tl.int64)
    p_s = state_ptr + (slot * HV + h) * (DK * DV) + ok[:, None] * DV + ov[None, :]
    ms = mk[:, None] & mv[None, :]
    s = tl.load(p_s, mask=ms, other=0.0).to(tl.float32)  # [BK, BV]
    s = s * tl.exp(gv)
    u = bv * (vv - tl.sum(s * kv[:, None], 0))  # beta (v - S^T k), [BV]
    s = s + kv[:, None] * u[None, :]
    o = tl.sum(s * qv[:, None], 0)
    tl.store(o_ptr + (b * HV + h) * DV + ov, o.to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(p_s, s.to(state_ptr.dtype.element_ty), mask=ms)


def _decode(q, k, v, g, beta, ssm_states, slots: torch.Tensor) -> torch.Tensor:
    # q, k [B, Hk, dk]; v [B, Hv, dv]; g, beta [B, Hv]. Last dims must be unit-stride (views of the conv output are).
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    B, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    o = torch.empty(B, hv, dv, dtype=v.dtype, device=v.device)
    if B == 0:
        return o
    bv = min(_DECODE_BV, triton.next_power_of_2(dv))
    grid = (B * hv, triton.cdiv(dv, bv))
    # NOTE: two sequences sharing a slot would race; the pool hands each live sequence its own slot (padding rows
    # of a CUDA graph may share the dummy slot, whose contents nobody reads).
    _decode_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        o,
        ssm_states,
        slots,
        dk**-0.5,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        HK=hk,
        HV=hv,
        DK=dk,
        DV=dv,
        BK=triton.next_power_of_2(dk),
        BV=bv,
        num_warps=_DECODE_WARPS,
    )
    return o


# ---- gates: sigmoid / softplus of the ba projection, one launch instead of eight ----


@triton.jit
def _gates_kernel(ba_ptr, a_log_ptr, dt_bias_ptr, g_ptr, beta_ptr, n, stride_t, HV: tl.constexpr, R: tl.constexpr):
    idx = tl.program_id(0) * 1024 + tl.arange(0, 1024)  # flat (token, value head)
    m = idx < n
    t = idx // HV
    h = idx % HV
    # Value head h is the (h % R)-th of key head h // R, whose row part is [b (R) | a (R)].
    base = ba_ptr + t * stride_t + (h // R) * (2 * R) + h % R
    b = tl.load(base, mask=m, other=0.0).to(tl.float32)
    a = tl.load(base + R, mask=m, other=0.0).to(tl.float32)
    a_log = tl.load(a_log_ptr + h, mask=m, other=0.0).to(tl.float32)
    dt = tl.load(dt_bias_ptr + h, mask=m, other=0.0).to(tl.float32)
    x = a + dt
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # torch's softplus threshold
    tl.store(g_ptr + idx, -tl.exp(a_log) * softplus, mask=m)
    tl.store(beta_ptr + idx, (1.0 / (1.0 + tl.exp(-b))).to(beta_ptr.dtype.element_ty), mask=m)


def gdn_gates(ba: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `nextserve.ops.gdn.gdn_gates`: ba [T, Hk, 2r] (rows unit-stride inside) -> (g, beta)."""
    T, hk, r2 = ba.shape
    if ba.stride(2) != 1 or ba.stride(1) != r2:
        ba = ba.contiguous()
    hv = hk * r2 // 2
    g = torch.empty(T, hv, dtype=torch.float32, device=ba.device)
    beta = torch.empty(T, hv, dtype=ba.dtype, device=ba.device)
    if T:
        _gates_kernel[(triton.cdiv(T * hv, 1024),)](ba, A_log, dt_bias, g, beta, T * hv, ba.stride(0), HV=hv, R=r2 // 2)
    return g, beta
