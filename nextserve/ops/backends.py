"""Which implementation each op runs, decided once when an engine starts and logged in one line, e.g.

    backends on cuda: attention=triton-paged conv1d=triton gdn=fla-chunk+triton-decode moe=triton-fused
    norm=triton fp8=triton+scaled_mm

Each op module imports its fast path under `try` (CPU-only installs have no Triton) and keeps the import error. On
a CUDA device a missing fast path is an error that names the package and the import error, never a silent fall
back to the torch reference; `--allow-reference-kernels` turns that error into a warning (the reference then
serves those ops, slowly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    op: str
    fast: str  # what runs on CUDA when the fast path imported
    module: object | None  # the imported fast-path module, None when it failed
    error: BaseException | None
    package: str  # what to install when it failed


def _backends() -> list[Backend]:
    from nextserve.ops import attention, conv1d, fp8, gdn, moe, norm

    out = [
        Backend("attention", "triton-paged", attention.attention_triton, attention.IMPORT_ERROR, "triton"),
        Backend("conv1d", "triton", conv1d.conv1d_triton, conv1d.IMPORT_ERROR, "triton"),
        Backend("gdn", "fla-chunk+triton-decode", gdn.gdn_cuda, gdn.IMPORT_ERROR, "triton"),
        Backend("moe", "triton-fused", moe.moe_triton, moe.IMPORT_ERROR, "triton"),
        Backend("norm", "triton", norm.norm_triton, norm.IMPORT_ERROR, "triton"),
        Backend("fp8", "triton", fp8.fp8_triton, fp8.IMPORT_ERROR, "triton"),
    ]
    if gdn.gdn_cuda is not None and gdn.gdn_cuda.FLA_IMPORT_ERROR is not None:  # Triton is there, fla-core is not
        out[2] = Backend(
            "gdn", "fla-chunk", None, gdn.gdn_cuda.FLA_IMPORT_ERROR, "fla-core==0.6.0 (pip install '.[gpu]')"
        )
    return out


def select(device: torch.device, allow_reference: bool = False) -> dict[str, str]:
    """op -> the implementation it runs on `device`; raises RuntimeError on CUDA when a fast path is missing
    (unless `allow_reference`). Logs the choice once."""
    chosen: dict[str, str] = {}
    missing: list[Backend] = []
    for b in _backends():
        if device.type != "cuda":
            chosen[b.op] = "torch-reference"
        elif b.module is None:
            missing.append(b)
            chosen[b.op] = "torch-reference"
        else:
            chosen[b.op] = b.fast
    if missing:
        lines = "; ".join(f"{b.op}: install {b.package} ({type(b.error).__name__}: {b.error})" for b in missing)
        if not allow_reference:
            raise RuntimeError(
                f"CUDA fast paths failed to import, {lines}. Install them, or pass --allow-reference-kernels to "
                "run those ops on the (slow) torch reference"
            )
        logger.warning("running on the torch reference instead of the CUDA fast path: %s", lines)
    if device.type == "cuda" and chosen["fp8"] == "triton":
        from nextserve.ops import fp8  # its fp8_triton: the module that imported (never import Triton here)

        if fp8.fp8_triton.SCALED_MM_MIN_M is not None:
            chosen["fp8"] = f"triton+scaled_mm(M>={fp8.fp8_triton.SCALED_MM_MIN_M})"
    logger.info("backends on %s: %s", device.type, " ".join(f"{op}={impl}" for op, impl in chosen.items()))
    return chosen
