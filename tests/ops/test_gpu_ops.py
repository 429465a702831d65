"""CUDA fast paths of the GDN ops against their torch references (run on the device: pytest -m gpu).

Each test draws random inputs, runs the public op on CUDA (which dispatches to Triton / fla) and the same op on
CPU copies (the torch reference), and compares outputs and the whole slot pool: varlen batches of mixed lengths,
non-zero states at scattered slots, snapshots at several offsets, decode batches, fp32 and bf16.

`python tests/ops/test_gpu_ops.py` prints a timing table, fast path vs reference, at Qwen3-Next shapes.
"""

from __future__ import annotations

import importlib.util
import random
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from nextserve.forward_batch import ForwardBatch
from nextserve.ops import conv1d, gdn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LENS = [1, 5, 64, 65, 300]
F32, BF16 = torch.float32, torch.bfloat16
# (activation dtype, pool dtype) -> relative-error bound. fla's fp32 dots run in tf32 (~1e-3); bf16 inputs ~1e-2.
GDN_CASES = {(F32, F32): 5e-3, (BF16, BF16): 3e-2, (BF16, F32): 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "NaN or inf in the fast path's output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def make_batch(lens: list[int], num_slots: int, snaps_per_seq: int, seed: int, device: str) -> ForwardBatch:
    """Scattered distinct slots; snapshots at random offsets (0 and n included), into distinct free slots."""
    rng = random.Random(seed)
    slots = rng.sample(range(1, num_slots), len(lens))
    free = [s for s in range(1, num_slots) if s not in slots]
    rng.shuffle(free)
    snaps = []
    for b, n in enumerate(lens):
        if not snaps_per_seq:
            break
        offsets = {1} if n == 1 else {rng.choice([0, n, rng.randint(1, n - 1)]) for _ in range(snaps_per_seq)}
        snaps += [(b, o, free.pop()) for o in sorted(offsets)]
    pages = [[0]] * len(lens)
    return ForwardBatch.build(lens, [0] * len(lens), slots, pages, 4096, device=device, snapshots=snaps)


def to_cpu(batch: ForwardBatch) -> ForwardBatch:
    fields = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    return ForwardBatch(**{f: v.cpu() if torch.is_tensor(v) else v for f, v in fields.items()})


def gdn_inputs(T, hk, hv, dk, dv, dtype, pool_dtype, num_slots, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q, k, v = rnd(T, hk, dk).to(dtype), rnd(T, hk, dk).to(dtype), rnd(T, hv, dv).to(dtype)
    gate = -torch.rand(T, hv, device="cuda", generator=g) * 0.5  # log decay <= 0, fp32 as the model makes it
    beta = torch.rand(T, hv, device="cuda", generator=g).to(dtype)
    pool = (rnd(num_slots, hv, dk, dv) * 0.3).to(pool_dtype)  # non-zero everywhere: unwritten slots would show
    return q, k, v, gate, beta, pool


def check_gdn(lens, dtype, pool_dtype, snaps_per_seq, seed, hk=2, hv=4, dk=128, dv=128):
    S = 3 * len(lens) * (snaps_per_seq + 1) + 2
    batch = make_batch(lens, S, snaps_per_seq, seed, "cuda")
    q, k, v, g, beta, pool = gdn_inputs(sum(lens), hk, hv, dk, dv, dtype, pool_dtype, S, seed)
    ref_pool = pool.cpu()
    ref = gdn.gated_delta_rule(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), ref_pool, to_cpu(batch))
    out = gdn.gated_delta_rule(q, k, v, g, beta, pool, batch)
    tol = GDN_CASES[(dtype, pool_dtype)]
    assert out.dtype == v.dtype and out.shape == v.shape
    assert rel_err(out, ref) < tol
    for s in range(S):  # every slot: written ones match, untouched ones stay as they were
        assert rel_err(pool[s], ref_pool[s]) < tol, f"slot {s}"


def require_fla():
    if importlib.util.find_spec("fla") is None:
        pytest.fail("fla-core is not installed: on a GPU it is required (pip install '.[gpu]')")
    from nextserve.ops import gdn_cuda

    assert gdn_cuda._fla_chunk is not None, f"fla is installed but failed to import: {gdn_cuda.FLA_IMPORT_ERROR!r}"


def test_fast_paths_are_wired():
    assert gdn.gdn_cuda is not None, "Triton GDN path failed to import on a CUDA machine"
    assert conv1d.conv1d_triton is not None, "Triton conv1d path failed to import on a CUDA machine"


@pytest.mark.parametrize("dtype,pool_dtype", list(GDN_CASES))
def test_gdn_prefill_varlen_with_snapshots(dtype, pool_dtype):
    require_fla()
    check_gdn(LENS, dtype, pool_dtype, snaps_per_seq=3, seed=1)


def test_gdn_prefill_without_snapshots():
    """The one-call path (no cuts, no gather). Same head shape as above: fla autotunes per shape, slowly."""
    require_fla()
    check_gdn([300, 1, 64, 129], F32, F32, snaps_per_seq=0, seed=2)


@pytest.mark.parametrize("dtype,pool_dtype", list(GDN_CASES))
def test_gdn_decode_in_place(dtype, pool_dtype):
    # The decode kernel is plain fp32 arithmetic: fp32 agrees to rounding.
    check_gdn([1] * 37, dtype, pool_dtype, snaps_per_seq=1, seed=3)


def test_gdn_decode_tolerance_is_tight_in_fp32():
    S, lens = 20, [1] * 9
    batch = make_batch(lens, S, 0, 4, "cuda")
    q, k, v, g, beta, pool = gdn_inputs(9, 2, 4, 64, 128, F32, F32, S, 4)
    ref_pool = pool.cpu()
    ref = gdn.gated_delta_rule(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), ref_pool, to_cpu(batch))
    out = gdn.gated_delta_rule(q, k, v, g, beta, pool, batch)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(pool, ref_pool) < 1e-5


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("lens", [LENS, [1] * 33], ids=["prefill", "decode"])
def test_conv1d_matches_reference(dtype, lens):
    C, K, S = 3 * 130, 4, 160  # C not a multiple of the channel tile
    batch = make_batch(lens, S, 3, 5, "cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(sum(lens), C, device="cuda", generator=g).to(dtype)
    w = torch.randn(C, K, device="cuda", generator=g).to(dtype)
    pool = torch.randn(S, C, K - 1, device="cuda", generator=g).to(dtype)
    ref_pool = pool.cpu()
    ref = conv1d.causal_conv1d(x.cpu(), w.cpu(), ref_pool, to_cpu(batch))
    out = conv1d.causal_conv1d(x, w, pool, batch)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == F32 else 1e-2  # the bf16 reference rounds its conv to bf16 once
    assert rel_err(out, ref) < tol
    assert torch.equal(pool.cpu(), ref_pool), "windows are copies of inputs: they must match exactly"


@pytest.mark.parametrize("lens", [LENS, [1] * 5], ids=["prefill", "decode"])
def test_conv1d_split_parts(lens):
    """parts=[q, k, v] widths and a column map into a wider x (the model passes its projection output): the same
    values as the [T, C] output on x[:, columns], as contiguous parts on prefill."""
    parts = [64, 64, 262]
    C, K, S = sum(parts), 4, 40
    batch = make_batch(lens, S, 2, 9, "cuda")
    g = torch.Generator(device="cuda").manual_seed(9)
    wide = torch.randn(sum(lens), C + 100, device="cuda", generator=g)
    columns = torch.randperm(C + 100, device="cuda", generator=g)[:C].int()
    w = torch.randn(C, K, device="cuda", generator=g)
    pool = torch.randn(S, C, K - 1, device="cuda", generator=g)
    whole_pool = pool.clone()
    whole = conv1d.causal_conv1d(wide[:, columns.long()].contiguous(), w, whole_pool, batch)
    out = conv1d.causal_conv1d(wide, w, pool, batch, parts, columns=columns)
    assert [o.shape[1] for o in out] == parts
    # Two compiled variants (column map or not): the compiler may contract multiply-adds differently.
    assert rel_err(torch.cat(out, dim=1), whole) < 1e-6
    assert torch.equal(pool, whole_pool), "windows are copies of inputs: they must match exactly"
    if len(lens) != lens.count(1):
        assert all(o.is_contiguous() for o in out)


@pytest.mark.parametrize("lens", [LENS, [1] * 5], ids=["prefill", "decode"])
def test_conv1d_column_runs(lens):
    """The GDN's projection layout: per key head [q | k | v | z] columns, conv channels [q | k | v], the map in
    runs of 128 columns from 16-aligned starts (column_run): the same values as on the gathered copy."""
    hk, dk, rdv = 2, 128, 256
    parts = [hk * dk, hk * dk, hk * rdv]
    C, K, S = sum(parts), 4, 40
    j = torch.arange(hk)[:, None] * (2 * dk + 2 * rdv)
    cols = [j + torch.arange(dk), j + dk + torch.arange(dk), j + 2 * dk + torch.arange(rdv)]
    columns = torch.cat([c.flatten() for c in cols]).int().cuda()
    batch = make_batch(lens, S, 2, 9, "cuda")
    g = torch.Generator(device="cuda").manual_seed(10)
    proj = torch.randn(sum(lens), hk * (2 * dk + 2 * rdv), device="cuda", generator=g)
    w = torch.randn(C, K, device="cuda", generator=g)
    pool = torch.randn(S, C, K - 1, device="cuda", generator=g)
    whole_pool = pool.clone()
    whole = conv1d.causal_conv1d(proj[:, columns.long()].contiguous(), w, whole_pool, batch)
    out = conv1d.causal_conv1d(proj, w, pool, batch, parts, columns=columns, column_run=128)
    assert rel_err(torch.cat(out, dim=1), whole) < 1e-6
    assert torch.equal(pool, whole_pool)


def test_conv1d_strided_input():
    """The model hands the conv a column slice of a wider activation (last dim unit-stride, rows strided)."""
    C, K, S = 256, 4, 10
    lens = [70, 3]
    batch = make_batch(lens, S, 1, 6, "cuda")
    wide = torch.randn(sum(lens), C + 64, device="cuda")
    x = wide[:, 32 : 32 + C]
    w = torch.randn(C, K, device="cuda")
    pool = torch.randn(S, C, K - 1, device="cuda")
    ref_pool = pool.cpu()
    ref = conv1d.causal_conv1d(x.cpu(), w.cpu(), ref_pool, to_cpu(batch))
    out = conv1d.causal_conv1d(x, w, pool, batch)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(pool.cpu(), ref_pool)


# ---- timing: `python tests/ops/test_gpu_ops.py` ----


@contextmanager
def reference_only():
    """Routes the public ops to their torch references on CUDA, for timing the baseline."""
    with mock.patch.object(gdn, "gdn_cuda", None), mock.patch.object(conv1d, "conv1d_triton", None):
        yield


def bench() -> None:
    from triton.testing import do_bench

    hk, hv, dk, dv, C, K = 16, 32, 128, 128, 2 * 16 * 128 + 32 * 128, 4  # Qwen3-Next-80B-A3B linear attention
    rows = []

    def time_both(name, run, pool, bytes_moved=None):
        """run(pool) -> output. Times fast and reference on the same inputs; err compares them on copies."""
        start = pool.clone()  # both sides of the error check start from the same pool
        fast_out = run(start.clone())
        fast = do_bench(lambda: run(pool), warmup=50, rep=300, return_mode="median")
        with reference_only():
            ref_out = run(start.clone())
            ref = do_bench(lambda: run(pool), warmup=20, rep=300, return_mode="median")
        bw = f"{bytes_moved / fast / 1e6:.0f}" if bytes_moved else "-"
        rows.append((name, fast, ref, ref / fast, bw, rel_err(fast_out, ref_out)))

    for pool_dtype in (F32, BF16):
        B, S = 64, 160
        batch = make_batch([1] * B, S, 0, 7, "cuda")
        q, k, v, g, beta, pool = gdn_inputs(B, hk, hv, dk, dv, BF16, pool_dtype, S, 7)
        state_bytes = 2 * B * hv * dk * dv * pool.element_size()  # read + write each state once
        name = f"gdn decode B={B} pool={str(pool_dtype)[6:]}"
        time_both(name, lambda p, b=batch, a=(q, k, v, g, beta): gdn.gated_delta_rule(*a, p, b), pool, state_bytes)
    lens = [1024] * 8
    q, k, v, g, beta, pool = gdn_inputs(sum(lens), hk, hv, dk, dv, BF16, F32, 40, 8)
    for snaps in (0, 2):
        batch = make_batch(lens, 40, snaps, 8, "cuda")
        name = f"gdn prefill 8x1024 tok, {snaps} snap/seq"
        time_both(name, lambda p, b=batch, a=(q, k, v, g, beta): gdn.gated_delta_rule(*a, p, b), pool)

    for lens, name in (([1] * 64, "conv decode B=64"), ([1024] * 8, "conv prefill 8x1024 tok")):
        batch = make_batch(lens, 80, 0, 9, "cuda")
        x = torch.randn(sum(lens), C, device="cuda", dtype=BF16)
        w = torch.randn(C, K, device="cuda", dtype=BF16)
        pool = torch.randn(80, C, K - 1, device="cuda", dtype=BF16)
        moved = 2 * x.numel() * x.element_size()  # read x, write out (windows are small)
        time_both(name, lambda p, b=batch, x=x, w=w: conv1d.causal_conv1d(x, w, p, b), pool, moved)

    print(f"\n{torch.cuda.get_device_name()}  (Hk={hk} Hv={hv} dk=dv={dk}, conv C={C} K={K}, bf16 activations)")
    print(f"{'case':36s} {'fast ms':>9s} {'ref ms':>9s} {'speedup':>8s} {'GB/s':>6s} {'rel err':>8s}")
    for name, fast, ref, up, bw, err in rows:
        print(f"{name:36s} {fast:9.3f} {ref:9.3f} {up:7.1f}x {bw:>6s} {err:8.1e}")


if __name__ == "__main__":
    bench()
