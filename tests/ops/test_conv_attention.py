"""Varlen causal conv1d with slot windows, and paged attention, against direct computations."""

import torch
import torch.nn.functional as F

from nextserve.forward_batch import ForwardBatch
from nextserve.ops.attention import paged_attention
from nextserve.ops.conv1d import causal_conv1d


def test_conv_split_into_steps_equals_one_pass():
    C, K, T = 6, 4, 11
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(T, C, generator=g), torch.randn(C, K, generator=g)
    ref = F.silu(F.conv1d(F.pad(x.t()[None], (K - 1, 0)), w[:, None], groups=C))[0].t()
    states = torch.zeros(3, C, K - 1)
    out = [causal_conv1d(x[:5], w, states, ForwardBatch.build([5], [0], [2], [[1]], 16))]
    for t in range(5, T):  # decode path, one token at a time
        out.append(causal_conv1d(x[t : t + 1], w, states, ForwardBatch.build([1], [t], [2], [[1]], 16)))
    assert torch.allclose(torch.cat(out), ref, atol=1e-6)
    assert torch.allclose(states[2], x[-3:].t())


def test_conv_parts_and_column_map_equal_the_plain_conv():
    """parts split the output; columns read x[:, columns] (the model's projection, wider than the conv). The
    reference is the convolution written out: per sequence and channel, the saved window then the mapped column,
    sum_k w[c, k] * u[t + k], SiLU."""
    C, K, T, X = 6, 4, 9, 10
    g = torch.Generator().manual_seed(2)
    wide, w = torch.randn(T, X, generator=g), torch.randn(C, K, generator=g)
    columns = torch.tensor([7, 0, 3, 9, 4, 1], dtype=torch.int32)
    states = torch.randn(3, C, K - 1, generator=g)
    before = states.clone()
    lens, slots = [4, 5], [1, 2]
    batch = ForwardBatch.build(lens, [0, 3], slots, [[1], [2]], 16)
    parts = causal_conv1d(wide, w, states, batch, [2, 1, 3], columns=columns)
    assert [p.shape for p in parts] == [(T, 2), (T, 1), (T, 3)]
    ref, start = torch.empty(T, C), 0
    for n, slot in zip(lens, slots):
        for c in range(C):
            u = before[slot, c].tolist() + [wide[start + t, int(columns[c])].item() for t in range(n)]
            for t in range(n):
                ref[start + t, c] = F.silu(torch.tensor(sum(w[c, k].item() * u[t + k] for k in range(K))))
            assert torch.equal(states[slot, c], torch.tensor(u[-(K - 1) :])), (slot, c)
        start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(states[0], before[0])  # slot 0 belongs to no sequence


def test_paged_attention_with_cached_prefix_matches_dense():
    Hq, Hkv, D, L, ps = 4, 2, 8, 13, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(L, Hq, D, generator=g),
        torch.randn(L, Hkv, D, generator=g),
        torch.randn(L, Hkv, D, generator=g),
    )
    kc, vc = torch.zeros(10, ps, Hkv, D), torch.zeros(10, ps, Hkv, D)
    pages = [7, 2, 9, 4]  # scattered pages
    # prefix of 9 tokens first, then 4 more with the prefix cached
    paged_attention(q[:9], k[:9], v[:9], kc, vc, ForwardBatch.build([9], [0], [1], [pages], ps), D**-0.5)
    out = paged_attention(q[9:], k[9:], v[9:], kc, vc, ForwardBatch.build([4], [9], [1], [pages], ps), D**-0.5)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask,
    )
    assert torch.allclose(out, ref.transpose(0, 1)[9:], atol=1e-5)


def test_conv_snapshot_is_the_window_at_its_offset():
    C, K, T = 5, 4, 9
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(T, C, generator=g), torch.randn(C, K, generator=g)
    states = torch.zeros(3, C, K - 1)
    causal_conv1d(x, w, states, ForwardBatch.build([T], [0], [1], [[1]], 16, snapshots=[(0, 6, 2)]))
    assert torch.allclose(states[2], x[3:6].t())
    assert torch.allclose(states[1], x[-3:].t())


def test_batched_decode_attention_equals_per_sequence():
    Hq, Hkv, D, ps = 4, 2, 8, 4
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(20, ps, Hkv, D, generator=g), torch.randn(20, ps, Hkv, D, generator=g)
    lens = [1, 6, 13]
    tables = [[3], [5, 9], [2, 7, 11, 4]]
    q = torch.randn(3, Hq, D, generator=g)
    k, v = torch.randn(3, Hkv, D, generator=g), torch.randn(3, Hkv, D, generator=g)
    batch = ForwardBatch.build([1, 1, 1], [n - 1 for n in lens], [1, 2, 3], tables, ps)
    out = paged_attention(q, k, v, kc.clone(), vc.clone(), batch, D**-0.5)
    for b, (n, t) in enumerate(zip(lens, tables)):
        # A second row of two tokens keeps this batch off the decode path: the per-sequence reference.
        one = ForwardBatch.build([1, 2], [n - 1, 0], [1, 2], [t, [19]], ps)
        ref = paged_attention(
            torch.cat([q[b : b + 1], q[:2]]),
            torch.cat([k[b : b + 1], k[:2]]),
            torch.cat([v[b : b + 1], v[:2]]),
            kc.clone(),
            vc.clone(),
            one,
            D**-0.5,
        )
        assert not one.is_decode
        assert torch.allclose(out[b], ref[0], atol=1e-5)


def test_conv_uniform_batch_with_snapshots():
    """Two sequences of 3 tokens (the verify shape) against the per-sequence path, snapshot after 2 tokens."""
    C, K, n = 5, 4, 3
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2 * n, C, generator=g), torch.randn(C, K, generator=g)
    states = torch.randn(6, C, K - 1, generator=g)
    before = states.clone()
    out = causal_conv1d(x, w, states, ForwardBatch.build([n, n], [0, 0], [1, 2], [[1], [1]], 16, snapshots=[(1, 2, 5)]))
    for b, slot in enumerate((1, 2)):
        ref_states = before.clone()
        # A second row of another length keeps the reference batch off the uniform path.
        ref = causal_conv1d(
            torch.cat([x[b * n : (b + 1) * n], torch.zeros(2, C)]),
            w,
            ref_states,
            ForwardBatch.build([n, 2], [0, 0], [slot, 4], [[1], [1]], 16),
        )
        assert torch.allclose(out[b * n : (b + 1) * n], ref[:n], atol=1e-6)
        assert torch.allclose(states[slot], ref_states[slot], atol=1e-6)
    assert torch.allclose(states[5], torch.cat([before[2], x[n:].t()], dim=1)[:, 2 : 2 + K - 1], atol=1e-6)


def test_prefill_after_cached_prefix_in_query_blocks(monkeypatch):
    import nextserve.ops.attention as attention

    monkeypatch.setattr(attention, "_QUERY_BLOCK", 3)  # several blocks over the 8 new queries
    Hq, Hkv, D, L, ps = 4, 2, 8, 13, 4
    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(L, Hq, D, generator=g),
        torch.randn(L, Hkv, D, generator=g),
        torch.randn(L, Hkv, D, generator=g),
    )
    kc, vc = torch.zeros(10, ps, Hkv, D), torch.zeros(10, ps, Hkv, D)
    pages = [6, 1, 8, 3]
    paged_attention(q[:5], k[:5], v[:5], kc, vc, ForwardBatch.build([5], [0], [1], [pages], ps), D**-0.5)
    out = paged_attention(q[5:], k[5:], v[5:], kc, vc, ForwardBatch.build([8], [5], [1], [pages], ps), D**-0.5)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask,
    )
    assert torch.allclose(out, ref.transpose(0, 1)[5:], atol=1e-5)
