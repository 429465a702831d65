"""Triton paged decode attention (`nextserve.ops.attention_triton`) against a float64 gather-and-softmax reference.

Random inputs: varlen contexts (1 to 300 tokens), shuffled page tables with garbage past each length, page sizes 1,
16 and non-powers of two, GQA groups 1/2/4/8, fp32 / bf16 / fp16, one split and more splits than blocks. Cache slots
that no sequence may read hold NaN, so any read past a length shows up. Also: a padding row, a CUDA-graph replay
after the page table and lengths change in place, and the default split count.

Runs on the device (pytest -m gpu) or on CPU under the Triton interpreter:
    PYTHONPATH=/tmp/tsite TRITON_INTERPRET=1 python -m pytest -m gpu tests/ops/test_gpu_attention.py
`python tests/ops/test_gpu_attention.py` prints timings at Qwen3-Next shapes (bf16, D=256, Hq=16, Hkv=2).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from nextserve.forward_batch import ForwardBatch
from nextserve.ops.attention import _decode_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs a CUDA GPU or TRITON_INTERPRET=1"),
]
pytest.importorskip("triton")
from nextserve.ops import attention_triton  # noqa: E402 - only importable with Triton

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LENS = [1, 2, 15, 16, 17, 100, 300]
TOL = {F32: 1e-5, BF16: 2e-2, F16: 5e-3}


class Case:
    """A decode batch over a shuffled page pool. Legend: B sequences, Hq / Hkv heads, D head dim, W table width."""

    def __init__(self, lens, page_size, hkv, group, d, dtype, seed, poison=True):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.lens, self.page_size, self.scale = lens, page_size, d**-0.5
        n_pages = [-(-n // page_size) for n in lens]
        num_pages = sum(n_pages) + 3  # a few pages nobody owns
        ids = list(range(num_pages))
        rng.shuffle(ids)
        self.pages, start = [], 0
        for n in n_pages:
            self.pages.append(ids[start : start + n])
            start += n
        B, hq, W = len(lens), hkv * group, max(n_pages) + 2

        def rnd(*shape):
            return torch.randn(*shape, generator=gen)

        # q is a head slice of a wider projection, as the model hands it over (strided rows).
        self.q = rnd(B, hq + 2 * hkv, d)[:, :hq].to(dtype)
        k, v = rnd(num_pages, page_size, hkv, d), rnd(num_pages, page_size, hkv, d)
        if poison:  # every slot that no sequence may read: NaN
            live = torch.zeros(num_pages, page_size, dtype=torch.bool)
            for n, pages in zip(lens, self.pages):
                live.view(-1)[torch.tensor([pages[t // page_size] * page_size + t % page_size for t in range(n)])] = 1
            k[~live], v[~live] = float("nan"), float("nan")
        self.k_cache, self.v_cache = k.to(dtype), v.to(dtype)
        # The page table is a slice of a wider buffer (a CUDA-graph runner's static one); entries past a length
        # are garbage, out-of-range ones included.
        junk = [-1, num_pages, 2**30, 7]
        buf = torch.tensor([[rng.choice(junk) for _ in range(W + 3)] for _ in range(B + 1)], dtype=torch.int32)
        for b, pages in enumerate(self.pages):
            buf[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.page_table = buf[:B, :W]
        self.context_lens = torch.tensor(lens, dtype=torch.int32)

    def run(self, num_splits=None, device=DEVICE):
        t = (self.q, self.k_cache, self.v_cache, self.page_table, self.context_lens)
        q, kc, vc, pt, cl = (x.to(device) for x in t)
        return attention_triton.paged_decode_attention(q, kc, vc, pt, cl, self.scale, num_splits=num_splits)

    def reference(self) -> torch.Tensor:
        """Each sequence on its own: gather its live tokens, softmax, in float64."""
        B, hq, d = self.q.shape
        group = hq // self.k_cache.shape[2]
        out = torch.empty(B, hq, d, dtype=torch.float64)
        for b, (n, pages) in enumerate(zip(self.lens, self.pages)):
            kb, vb = (
                x[pages].flatten(0, 1)[:n].double().repeat_interleave(group, 1) for x in (self.k_cache, self.v_cache)
            )
            s = torch.einsum("hd,thd->ht", self.q[b].double(), kb) * self.scale  # [Hq, n]
            out[b] = torch.einsum("ht,thd->hd", s.softmax(-1), vb)
        return out


def worst_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error of any one sequence (a whole-batch norm would hide one bad short row)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "NaN or inf in the kernel's output: it read past a length"
    return max(float((o - r).norm() / r.norm()) for o, r in zip(out, ref))


@pytest.mark.parametrize(
    "page_size,hkv,group,d,dtype,num_splits",
    [
        (16, 2, 8, 64, F32, 1),  # Qwen3-Next's grouping and page size, one split (no merge launch)
        (16, 2, 8, 64, F32, 16),  # more splits than blocks for every sequence: most splits empty
        (1, 2, 2, 32, F32, 5),  # one token per page
        (3, 1, 1, 32, F32, None),  # a page size that is not a power of two, no GQA, the default split count
        (16, 2, 8, 64, BF16, None),
        (6, 2, 2, 32, BF16, 32),
        (16, 1, 4, 32, F16, 3),
    ],
)
def test_matches_reference(page_size, hkv, group, d, dtype, num_splits):
    case = Case(LENS, page_size, hkv, group, d, dtype, seed=page_size * 31 + group)
    out = case.run(num_splits)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert worst_rel_err(out, case.reference()) < TOL[dtype]


def test_reference_agrees_with_the_model_path():
    """Ties this file's reference to `attention._decode_attention`, the op the model runs on CPU."""
    case = Case(LENS, 16, 2, 4, 32, F32, seed=3, poison=False)  # SDPA's masked slots still multiply NaNs
    batch = ForwardBatch.build([1] * len(LENS), [n - 1 for n in LENS], [0] * len(LENS), case.pages, 16)
    model = _decode_attention(case.q.double(), case.k_cache.double(), case.v_cache.double(), batch, case.scale)
    assert worst_rel_err(model, case.reference()) < 1e-12
    assert worst_rel_err(case.run(num_splits=4), model) < 1e-5


@pytest.mark.parametrize("num_splits", [1, 8])
def test_padding_row_reads_page_zero(num_splits):
    """A CUDA-graph padding row (length 1, page table all page 0) attends to slot 0 of page 0 alone."""
    case = Case([1, 40], 16, 2, 8, 32, F32, seed=4)
    case.page_table[0] = 0
    case.pages[0] = [0]
    for cache in (case.k_cache, case.v_cache):  # page 0 may be a spare (NaN) page: slot 0 becomes live data
        cache[0, 0] = torch.randn(cache.shape[2:])
    out = case.run(num_splits).cpu()
    want = case.v_cache[0, 0].repeat_interleave(8, 0)  # [Hq, D]: softmax over one token returns its value
    assert torch.equal(out[0], want)
    assert worst_rel_err(out[1:], case.reference()[1:]) < 1e-5


def test_torch_fallback_matches_reference():
    """The path for CPU tensors outside the interpreter (page-table garbage and NaN slots included)."""
    case = Case(LENS, 5, 2, 2, 32, F32, seed=5)
    out = attention_triton._torch_decode(
        case.q, case.k_cache, case.v_cache, case.page_table, case.context_lens, case.scale
    )
    assert worst_rel_err(out, case.reference()) < 1e-5


def test_default_num_splits():
    assert attention_triton.default_num_splits(132, 2, 132) == 1  # B * Hkv already fills the GPU
    assert attention_triton.default_num_splits(1, 2, 132) == attention_triton.MAX_SPLITS
    s = attention_triton.default_num_splits(16, 2, 132)
    assert 1 < s < attention_triton.MAX_SPLITS and 2 * 132 <= 16 * 2 * s <= 4 * 132


def test_bad_inputs_raise():
    case = Case([5], 4, 2, 2, 32, F32, seed=6)
    q, kc, vc, pt, cl = case.q, case.k_cache, case.v_cache, case.page_table, case.context_lens
    with pytest.raises(ValueError, match="power of two"):
        attention_triton.paged_decode_attention(q[..., :24], kc[..., :24], vc[..., :24], pt, cl, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton.paged_decode_attention(q.half(), kc, vc, pt, cl, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        attention_triton.paged_decode_attention(q, kc, vc, pt, cl, 1.0, num_splits=0)


@pytest.mark.skipif(DEVICE != "cuda" or INTERPRET, reason="CUDA graphs need a real GPU")
def test_cuda_graph_replay_with_new_lengths_and_pages():
    """Capture once; then rewrite context_lens and the page table in place and replay: the output follows."""
    first = Case([300, 1, 40, 17], 16, 2, 8, 64, BF16, seed=7)
    second = Case([5, 290, 1, 64], 16, 2, 8, 64, BF16, seed=8)  # same pool size: both own 28 pages
    assert first.k_cache.shape == second.k_cache.shape
    W = max(first.page_table.shape[1], second.page_table.shape[1])
    q, kc, vc = (x.cuda() for x in (first.q, first.k_cache, first.v_cache))
    pt = torch.zeros(4, W, dtype=torch.int32, device="cuda")
    pt[:, : first.page_table.shape[1]] = first.page_table.cuda()
    cl = first.context_lens.cuda()
    splits = 8  # fixed, so both sequences of steps use the merge launch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        attention_triton.paged_decode_attention(q, kc, vc, pt, cl, first.scale, splits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_triton.paged_decode_attention(q, kc, vc, pt, cl, first.scale, splits)
    graph.replay()
    assert worst_rel_err(out, first.reference()) < TOL[BF16]

    for x, y in ((q, second.q), (kc, second.k_cache), (vc, second.v_cache), (cl, second.context_lens)):
        x.copy_(y)
    pt.zero_()
    pt[:, : second.page_table.shape[1]] = second.page_table.cuda()
    graph.replay()
    assert worst_rel_err(out, second.reference()) < TOL[BF16]


# ---- timing: `python tests/ops/test_gpu_attention.py` ----


def bench() -> None:
    """Kernel (default splits, then each tile config of `configs`) against the torch reference, per batch shape."""
    from unittest import mock

    from triton.testing import do_bench

    hq, hkv, d, ps = 16, 2, 256, 16  # Qwen3-Next-80B-A3B full attention
    configs = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2)]  # (BLOCK_N, NUM_WARPS, NUM_STAGES)
    print(f"\n{torch.cuda.get_device_name()}  (Hq={hq} Hkv={hkv} D={d} page={ps}, bf16; times in us)")
    print(
        f"{'B':>4s} {'ctx':>6s} {'S':>3s} {'torch':>8s} {'kernel':>8s} {'GB/s':>6s} {'err':>8s}  "
        + " ".join(f"{'/'.join(map(str, c)):>9s}" for c in configs)
    )
    for B, ctx in ((1, 4096), (1, 32768), (8, 4096), (32, 2048), (64, 4096), (128, 1024), (256, 512)):
        case = Case([ctx] * B, ps, hkv, hq // hkv, d, BF16, seed=B, poison=False)
        args = [x.cuda() for x in (case.q, case.k_cache, case.v_cache, case.page_table, case.context_lens)]
        batch = ForwardBatch.build([1] * B, [ctx - 1] * B, [0] * B, case.pages, ps, device="cuda")

        def kernel(args=args, scale=case.scale):
            return attention_triton.paged_decode_attention(*args, scale)

        def torch_ref(args=args, batch=batch, scale=case.scale):
            return _decode_attention(*args[:3], batch, scale)

        splits = attention_triton.default_num_splits(B, hkv, attention_triton._sm_count(args[0].device))
        ref = do_bench(torch_ref, rep=200) * 1e3
        fast = do_bench(kernel, rep=200) * 1e3
        fp32 = [x.float() for x in args[:3]]
        err = worst_rel_err(kernel(), _decode_attention(*fp32, batch, case.scale))
        sweep = []
        for bn, warps, stages in configs:
            with mock.patch.multiple(attention_triton, BLOCK_N=bn, NUM_WARPS=warps, NUM_STAGES=stages):
                sweep.append(do_bench(kernel, rep=200) * 1e3)
        gbs = 2 * B * ctx * hkv * d * 2 / fast / 1e3  # K and V bytes read once
        cols = " ".join(f"{t:9.1f}" for t in sweep)
        print(f"{B:4d} {ctx:6d} {splits:3d} {ref:8.1f} {fast:8.1f} {gbs:6.0f} {err:8.1e}  {cols}")


if __name__ == "__main__":
    bench()
