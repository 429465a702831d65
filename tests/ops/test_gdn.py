"""Gated delta rule: chunked == recurrent (fp32, 1e-5) with a non-zero initial state, and a sequence split into
arbitrary chunks that carry state == one pass. Also the varlen dispatcher against per-sequence calls."""

import pytest
import torch

from nextserve.forward_batch import ForwardBatch
from nextserve.ops.gdn import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule


def inputs(T, hk=2, hv=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hk, dk, generator=g)
    k = torch.randn(T, hk, dk, generator=g)
    v = torch.randn(T, hv, dv, generator=g)
    gate = -torch.rand(T, hv, generator=g) * 0.5  # log decay <= 0
    beta = torch.rand(T, hv, generator=g)
    state = torch.randn(hv, dk, dv, generator=g) * 0.5
    return q, k, v, gate, beta, state


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_chunked_equals_recurrent(T):
    q, k, v, g, b, s0 = inputs(T)
    o1, s1 = recurrent_gated_delta_rule(q, k, v, g, b, s0)
    o2, s2 = chunk_gated_delta_rule(q, k, v, g, b, s0)
    assert (o1 - o2).abs().max() < 1e-5
    assert (s1 - s2).abs().max() < 1e-5


def test_recurrent_matches_the_definition():
    """One step by hand: S = a S0 + k (beta (v - (a S0)^T k))^T, o = S^T q, with l2-normalised q, k."""
    q, k, v, g, b, s0 = inputs(1, hk=1, hv=1)
    o, s = recurrent_gated_delta_rule(q, k, v, g, b, s0)
    qn = q[0, 0] / q[0, 0].norm() * 16**-0.5
    kn = k[0, 0] / k[0, 0].norm()
    a = g[0, 0].exp()
    pred = (a * s0[0]).t() @ kn
    s_ref = a * s0[0] + torch.outer(kn, b[0, 0] * (v[0, 0] - pred))
    assert torch.allclose(s[0], s_ref, atol=1e-5)
    assert torch.allclose(o[0, 0], s_ref.t() @ qn, atol=1e-5)


@pytest.mark.parametrize("cuts", [[37], [1, 2, 3], [64, 64], [10, 90, 5, 31]])
def test_chunks_carrying_state_equal_one_pass(cuts):
    T = 200
    q, k, v, g, b, s0 = inputs(T, seed=3)
    o_full, s_full = chunk_gated_delta_rule(q, k, v, g, b, s0)
    bounds = [0] + [sum(cuts[: i + 1]) for i in range(len(cuts))] + [T]
    s, outs = s0, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        o, s = chunk_gated_delta_rule(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], b[lo:hi], s)
        outs.append(o)
    assert (torch.cat(outs) - o_full).abs().max() < 1e-5
    assert (s - s_full).abs().max() < 1e-5


@pytest.mark.parametrize("lens", [[5, 1, 70], [1, 1, 1]])
def test_varlen_matches_per_sequence(lens):
    seqs = [inputs(n, seed=10 + i) for i, n in enumerate(lens)]
    cat = [torch.cat([s[j] for s in seqs]) for j in range(5)]
    pool = torch.zeros(5, 4, 16, 8)
    slots = [3, 1, 4]
    for slot, s in zip(slots, seqs):
        pool[slot] = s[5]
    batch = ForwardBatch.build(lens, [0] * len(lens), slots, [[1]] * len(lens), 128)
    out = gated_delta_rule(*cat, pool, batch)
    start = 0
    for slot, n, s in zip(slots, lens, seqs):
        o, st = recurrent_gated_delta_rule(*s)
        assert (out[start : start + n] - o).abs().max() < 1e-5
        assert (pool[slot] - st).abs().max() < 1e-5
        start += n


def test_snapshot_inside_a_chunk_is_the_state_at_that_offset():
    q, k, v, g, b, s0 = inputs(150, seed=5)
    pool = torch.zeros(4, 4, 16, 8)
    pool[1] = s0
    batch = ForwardBatch.build([150], [0], [1], [[1]], 256, snapshots=[(0, 64, 2), (0, 100, 3)])
    gated_delta_rule(q, k, v, g, b, pool, batch)
    for off, slot in ((64, 2), (100, 3)):
        _, s = recurrent_gated_delta_rule(q[:off], k[:off], v[:off], g[:off], b[:off], s0)
        assert (pool[slot] - s).abs().max() < 1e-5
    _, s = recurrent_gated_delta_rule(q, k, v, g, b, s0)
    assert (pool[1] - s).abs().max() < 1e-5


def test_uniform_batch_with_snapshots_matches_per_sequence():
    """The verify shape: every sequence brings 3 tokens; snapshots after 1 and 2 of them."""
    seqs = [inputs(3, seed=20 + i) for i in range(4)]
    cat = [torch.cat([s[j] for s in seqs]) for j in range(5)]
    pool = torch.zeros(20, 4, 16, 8)
    slots = [2, 5, 7, 9]
    for slot, s in zip(slots, seqs):
        pool[slot] = s[5]
    snaps = [(b, o, 10 + 2 * b + o - 1) for b in range(4) for o in (1, 2)]
    batch = ForwardBatch.build([3] * 4, [0] * 4, slots, [[1]] * 4, 128, snapshots=snaps)
    assert batch.uniform_len == 3
    out = gated_delta_rule(*cat, pool, batch)
    for b, (slot, s) in enumerate(zip(slots, seqs)):
        o, st = recurrent_gated_delta_rule(*s)
        assert (out[3 * b : 3 * b + 3] - o).abs().max() < 1e-5
        assert (pool[slot] - st).abs().max() < 1e-5
        for off in (1, 2):
            _, mid = recurrent_gated_delta_rule(*(x[:off] for x in s[:5]), s[5])
            assert (pool[10 + 2 * b + off - 1] - mid).abs().max() < 1e-5
