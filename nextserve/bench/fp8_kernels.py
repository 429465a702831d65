"""Micro-benchmark of the block-FP8 kernels against their bf16 counterparts at Qwen3-Next-80B-A3B shapes (device only):

    python -m nextserve.bench.fp8_kernels [--sweep] [--sweep-experts] [--no-linears] [--no-experts]

Tables: the dense linears (fp8_triton.linear vs F.linear/cuBLAS), the routed experts (moe.fused_experts, FP8 vs
bf16: small-batch GEMV kernels up to moe.SMALL_BATCH_MAX tokens, the grouped kernels above), and the dense FP8 GEMM
rate at 8192^3 (fp8_triton.measure_fp8_matmul_tflops, for the roofline). Small M is reported in GB/s of weight bytes
read (bound by HBM), large M in TFLOP/s. Every timing is a CUDA-graph replay (no launch overhead, as in a decode step).
--sweep (--sweep-experts) also times the tile candidates that fp8_triton's GEMV and GEMM tiles (moe_triton.TILES_FP8
and moe_grouped_triton's FP8 tiles) were picked from.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nextserve.ops import fp8_triton as ft
from nextserve.ops import moe, moe_grouped_triton, moe_triton

BF16 = torch.bfloat16
B = ft.BLOCK
# (name, N, K) of the dense FP8 linears of one Qwen3-Next layer (TP1)
LINEARS = [
    ("gdn in_proj_qkvz", 12288, 2048),
    ("gdn out_proj", 2048, 4096),
    ("attn q_proj", 8192, 2048),
    ("attn k/v_proj", 512, 2048),
    ("attn o_proj", 2048, 4096),
    ("shared gate/up", 512, 2048),
    ("shared down", 2048, 512),
]
MS = (1, 4, 16, 64, 128, 2048, 8192)
E, TOP_K, H, INTER = 512, 10, 2048, 512


def time_us(fn, *args, reps: int = 10, iters: int = 5, **kwargs) -> float:
    """Microseconds per call of fn(*args, **kwargs): `reps` calls captured in one CUDA graph, replayed `iters` times
    (best of 3)."""
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / (iters * reps) * 1e6)
    return best


def fp8_weight(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp8 weight and positive scales (the values do not matter for timing)."""
    w = (torch.randn(N, K, device="cuda") * 64).clamp(-448, 448).to(ft.FP8_DTYPE)
    s = torch.rand(-(-N // 128), -(-K // 128), device="cuda") * 1e-3 + 1e-4
    return w, s


def rate(M: int, N: int, K: int, us: float, wbytes: float) -> str:
    """GB/s of weight bytes for small M, TFLOP/s for large."""
    if M <= 128:
        return f"{wbytes / us / 1e3:7.0f} GB/s"
    return f"{2 * M * N * K / us / 1e6:7.0f} TF/s"


def bench_linears() -> None:
    print(f"\n## dense linears: fp8_triton.linear vs bf16 F.linear (scaled_mm from M >= {ft.SCALED_MM_MIN_M})")
    head = f"{'fp8 us':>8} {'fp8 rate':>13} {'bf16 us':>8} {'bf16 rate':>13} {'x':>5}"
    print(f"{'layer':<18} {'N':>6} {'K':>5} {'M':>5} {head}")
    for name, N, K in LINEARS:
        w8, s8 = fp8_weight(N, K)
        w16 = torch.randn(N, K, device="cuda", dtype=BF16) * 0.02
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=BF16)
            t8 = time_us(ft.linear, x, w8, s8, B)
            t16 = time_us(F.linear, x, w16)
            r8, r16 = rate(M, N, K, t8, N * K + s8.numel() * 4), rate(M, N, K, t16, 2 * N * K)
            print(
                f"{name:<18} {N:>6} {K:>5} {M:>5} {t8:>8.1f} {r8:>13} {t16:>8.1f} {r16:>13} {t16 / t8:>5.2f}",
                flush=True,
            )


def sweep_linear() -> None:
    print("\n## linear tile sweep (us): GEMV tiles (BR x BC, warps) for small M, dot tiles (BM x BN, warps, stages)")
    gemv = [
        dict(BR=br, BC=bc, num_warps=w)
        for br, bc, w in [(4, 1024, 4), (8, 1024, 4), (4, 2048, 4), (2, 1024, 4), (8, 512, 4), (16, 512, 8)]
    ]
    dots = [
        dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(16, 64, 4, 4), (16, 32, 4, 6), (32, 64, 4, 4), (64, 64, 4, 4), (16, 128, 4, 4)]
    ]
    for N, K in [(12288, 2048), (2048, 4096), (512, 2048)]:
        w8, s8 = fp8_weight(N, K)
        for M, cands in [(1, gemv), (4, gemv), (8, gemv), (16, gemv[:2] + dots), (32, dots)]:
            x = torch.randn(M, K, device="cuda", dtype=BF16)
            res = []
            for c in cands:
                try:
                    res.append((time_us(ft.linear, x, w8, s8, B, tile=c), c))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is skipped
                    print(f"  {c}: {type(e).__name__}")
            res.sort(key=lambda r: r[0])
            print(f"N={N} K={K} M={M}: " + "  ".join(f"{t:.1f}:{_tile_name(c)}" for t, c in res[:4]), flush=True)


def _tile_name(c: dict) -> str:
    if "BR" in c:
        return f"gemv{c['BR']}x{c['BC']}w{c['num_warps']}"
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}w{c['num_warps']}s{c['num_stages']}"


def _scaled_mm_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    xq, xs = ft.quantize_act(x, 128, m_major=True)
    return ft._scaled_mm(xq, xs, w, ws, x.dtype)


def experts(fp8: bool):
    if fp8:
        w13 = (torch.randn(E, 2 * INTER, H, device="cuda") * 64).clamp(-448, 448).to(ft.FP8_DTYPE)
        w2 = (torch.randn(E, H, INTER, device="cuda") * 64).clamp(-448, 448).to(ft.FP8_DTYPE)
        s13 = torch.rand(E, 2 * INTER // 128, H // 128, device="cuda") * 1e-4
        s2 = torch.rand(E, H // 128, INTER // 128, device="cuda") * 1e-4
        return w13, w2, dict(w13_scale=s13, w2_scale=s2, block=B)
    return (
        torch.randn(E, 2 * INTER, H, device="cuda", dtype=BF16) * 0.02,
        torch.randn(E, H, INTER, device="cuda", dtype=BF16) * 0.02,
        {},
    )


def bench_experts() -> None:
    print(f"\n## routed experts (E={E}, top-{TOP_K}, H={H}, I={INTER}): moe.fused_experts FP8 vs bf16")
    print(f"{'N':>5} {'experts':>7} {'fp8 us':>8} {'fp8 rate':>13} {'bf16 us':>8} {'bf16 rate':>13} {'x':>5}")
    w13_8, w2_8, sc = experts(True)
    w13_16, w2_16, _ = experts(False)
    for N in (1, 16, 32, 64, 128, 2048, 8192):
        x = torch.randn(N, H, device="cuda", dtype=BF16)
        weights, ids = moe.route(torch.randn(N, E, device="cuda"), TOP_K, True)
        hit = ids.unique().numel()
        t8 = time_us(moe.fused_experts, x, w13_8, w2_8, weights, ids, reps=5 if N > 1000 else 10, **sc)
        t16 = time_us(moe.fused_experts, x, w13_16, w2_16, weights, ids, reps=5 if N > 1000 else 10)
        per_expert = 3 * H * INTER
        if N <= 128:
            r8, r16 = f"{hit * per_expert / t8 / 1e3:7.0f} GB/s", f"{hit * per_expert * 2 / t16 / 1e3:7.0f} GB/s"
        else:
            fl = 2 * N * TOP_K * per_expert
            r8, r16 = f"{fl / t8 / 1e6:7.0f} TF/s", f"{fl / t16 / 1e6:7.0f} TF/s"
        print(f"{N:>5} {hit:>7} {t8:>8.1f} {r8:>13} {t16:>8.1f} {r16:>13} {t16 / t8:>5.2f}", flush=True)


def sweep_experts() -> None:
    print("\n## FP8 expert tile sweep (us)")
    w13, w2, sc = experts(True)
    for N in (1, 16):
        x = torch.randn(N, H, device="cuda", dtype=BF16)
        weights, ids = moe.route(torch.randn(N, E, device="cuda"), TOP_K, True)
        res = []
        for gr, gc, dr, dc, gw in [
            (4, 1024, 8, 512, 4),
            (8, 1024, 8, 512, 4),
            (4, 2048, 8, 512, 4),
            (8, 2048, 16, 512, 8),
            (2, 2048, 4, 512, 4),
            (4, 512, 8, 256, 4),
            (8, 1024, 16, 512, 4),
        ]:
            t = dict(gu_rows=gr, gu_cols=gc, gu_warps=gw, down_rows=dr, down_cols=dc, down_warps=gw)
            us = time_us(moe_triton.fused_experts, x, w13, w2, weights, ids, tiles=t, **sc)
            res.append((us, t))
        res.sort(key=lambda r: r[0])
        print(
            f"N={N}: "
            + "  ".join(
                f"{u:.1f}:{t['gu_rows']}x{t['gu_cols']}/{t['down_rows']}x{t['down_cols']}w{t['gu_warps']}"
                for u, t in res
            ),
            flush=True,
        )
    N = 8192
    x = torch.randn(N, H, device="cuda", dtype=BF16)
    weights, ids = moe.route(torch.randn(N, E, device="cuda"), TOP_K, True)
    res = []
    for bm, gw, gs, dn, dw, ds in [
        (64, 8, 3, 128, 4, 3),
        (128, 8, 3, 128, 4, 3),
        (64, 4, 4, 128, 4, 4),
        (128, 8, 4, 128, 8, 3),
        (64, 8, 3, 64, 4, 4),
        (128, 8, 3, 256, 8, 3),
        (64, 4, 3, 128, 8, 3),
    ]:
        gu = dict(BLOCK_N=128, BLOCK_K=128, num_warps=gw, num_stages=gs)
        dt = dict(BLOCK_N=dn, BLOCK_K=128, num_warps=dw, num_stages=ds)
        try:
            fn = moe_grouped_triton.grouped_experts
            us = time_us(fn, x, w13, w2, weights, ids, gate_up_tile=gu, down_tile=dt, block_m=bm, reps=3, **sc)
            res.append((us, (bm, gw, gs, dn, dw, ds)))
        except Exception as e:  # noqa: BLE001
            print(f"  {(bm, gw, gs, dn, dw, ds)}: {type(e).__name__}")
    res.sort(key=lambda r: r[0])
    print(
        f"grouped N={N} (bm, gu warps, gu stages, down BN, down warps, down stages): "
        + "  ".join(f"{u:.0f}:{c}" for u, c in res),
        flush=True,
    )


def bench_dense_rate() -> None:
    r = ft.measure_fp8_matmul_tflops("cuda")
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=BF16), torch.randn(n, n, device="cuda", dtype=BF16)
    bf = 2 * n**3 / ft._time(lambda: a @ b) / 1e12
    sm = f"{r['scaled_mm']:.0f}" if r["scaled_mm"] else "n/a"
    print(
        f"\n## dense 8192^3: fp8 Triton {r['triton']:.0f} TF/s, fp8 scaled_mm {sm} TF/s, bf16 cuBLAS {bf:.0f} TF/s",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time the linear's tile candidates")
    p.add_argument("--sweep-experts", action="store_true", help="also time the FP8 expert kernels' tile candidates")
    p.add_argument("--no-linears", action="store_true", help="skip the linear table")
    p.add_argument("--no-experts", action="store_true", help="skip the experts table")
    args = p.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"block-FP8 scaled_mm works: {ft.scaled_mm_works()}")
    bench_dense_rate()
    if args.sweep:
        sweep_linear()
    if args.sweep_experts:
        sweep_experts()
    if not args.no_linears:
        bench_linears()
    if not args.no_experts:
        bench_experts()


if __name__ == "__main__":
    main()
