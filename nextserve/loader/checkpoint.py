"""Read a Hugging Face safetensors checkpoint directory as a stream of (name, tensor) pairs.

Contract of ``iter_checkpoint``:
- Files: ``model.safetensors`` if present; else the shards named by ``model.safetensors.index.json``
  (``weight_map``; the index is authoritative, tensors a shard holds beyond it are ignored); else every
  ``*.safetensors`` in the directory, sorted by file name.
- Every file is memory-mapped and read one tensor at a time, in file order and, within a shard, index order.
- The whole layout (files, tensor names, dtypes, shapes, FP8 weight/scale pairs) is checked from the file
  headers before the first tensor is yielded, so a broken checkpoint fails fast, not after minutes of loading.
- FP8 (``quantization_config.quant_method == "fp8"``): a float8_e4m3fn tensor ``X`` (``X.weight``, or a fused
  expert tensor ``X.gate_up_proj`` / ``X.down_proj`` [E, rows, cols]) has its block scales in ``X_scale_inv``. Where
  ``keep_fp8(X)`` says so, both are yielded exactly as stored, the weight first; otherwise ``X`` is yielded
  dequantised (see ``fp8.py``) and its scale is consumed. A weight and its scale may live in different shards.
  ``fp8_modules`` lists, from the headers alone, the modules that hold FP8 weights.
- Names are yielded unchanged; mapping them onto model parameters is the model's job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from nextserve.loader.fp8 import check_block, dequantize_block_fp8, scale_shape

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # appended to "X.weight" (or to a fused expert tensor's name)
DEFAULT_FP8_BLOCK = (128, 128)
_FUSED_EXPERTS = (".gate_up_proj", ".down_proj")  # 3-D expert tensors of fused layouts (no ".weight")
# One routed expert's projection (per-expert layout) or the fused tensors: FP8-ness belongs to the experts module.
_EXPERT_MODULE = re.compile(r"^(?P<experts>.*\.mlp\.experts)\.(\d+\.(gate|up|down)_proj|gate_up_proj|down_proj)$")

# safetensors header dtype tags of the float8 formats.
_FP8_E4M3_TAG = "F8_E4M3"
_FP8_TAG_PREFIX = "F8_"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed, or inconsistent; the message names the file or tensor."""


@dataclass(frozen=True)
class _TensorInfo:
    """Where a tensor lives and what its header says, read without touching the data."""

    file: Path
    dtype: str  # safetensors tag, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``config.json`` from ``model_dir``."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def fp8_block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The FP8 weight block size a model config declares, or None when it declares no quantisation.

    Only block-wise e4m3 with dynamic activation scaling is supported; anything else raises CheckpointError.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"unsupported quantization_config.quant_method {method!r} (only 'fp8')")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"unsupported FP8 fmt {fmt!r} (only 'e4m3')")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"unsupported FP8 activation_scheme {scheme!r} (only 'dynamic')")
    block = qc.get("weight_block_size", list(DEFAULT_FP8_BLOCK))
    try:
        block = check_block(block)
    except ValueError as e:
        raise CheckpointError(f"bad quantization_config.weight_block_size: {e}") from e
    return block


def _read_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard path from the index, every shard checked to exist."""
    path = model_dir / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path} has no 'weight_map' object naming the tensors")
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: weight_map entry for {name!r} is not a file name: {file!r}")
        shard = model_dir / file
        if not shard.is_file():
            raise CheckpointError(f"{path} lists shard {file!r} (holding e.g. {name!r}) but {shard} does not exist")
        shards[name] = shard
    return shards


def _checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The files to read, and the index's name -> file map when the checkpoint has one."""
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None
    if (model_dir / INDEX_FILE).exists():
        index = _read_index(model_dir)
        return sorted(set(index.values())), index
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"no safetensors files in {model_dir}")
    return files, None


def _open(path: Path, stack: ExitStack) -> Any:
    """Memory-map one safetensors file; the handle closes with ``stack``."""
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a bad file
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _plan(
    files: list[Path], index: dict[str, Path] | None, stack: ExitStack
) -> tuple[dict[str, _TensorInfo], dict[Path, Any]]:
    """Open every file and list its tensors from the headers, in the order they will be read."""
    handles = {path: _open(path, stack) for path in files}
    listed: dict[Path, list[str]] = {path: [] for path in files}  # shard -> its names, in index order
    for name, file in (index or {}).items():
        listed[file].append(name)
    tensors: dict[str, _TensorInfo] = {}
    for path, handle in handles.items():
        keys = list(handle.keys())
        if index is not None:
            present = set(keys)
            keys = listed[path]
            missing = [name for name in keys if name not in present]
            if missing:
                raise CheckpointError(
                    f"tensor {missing[0]!r} is listed in {INDEX_FILE} under {path.name}, which lacks it"
                    + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                )
        for name in keys:
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {path}")
            header = handle.get_slice(name)
            tensors[name] = _TensorInfo(path, header.get_dtype(), tuple(header.get_shape()))
    return tensors, handles


def _is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX).endswith((".weight", *_FUSED_EXPERTS))


def _check_fp8(tensors: dict[str, _TensorInfo], block: tuple[int, int] | None) -> None:
    """Check that FP8 weights and their scales pair up one to one with matching shapes."""
    for name, info in tensors.items():
        if _is_scale(name):
            if block is None:
                raise CheckpointError(
                    f"found FP8 scale {name!r} in {info.file.name} but {CONFIG_FILE} declares no fp8 "
                    "quantization_config"
                )
            weight = tensors.get(name.removesuffix(SCALE_SUFFIX))
            if weight is None:
                raise CheckpointError(f"FP8 scale {name!r} has no weight {name.removesuffix(SCALE_SUFFIX)!r}")
            if weight.dtype != _FP8_E4M3_TAG:
                raise CheckpointError(
                    f"FP8 scale {name!r} belongs to {name.removesuffix(SCALE_SUFFIX)!r}, which is stored as "
                    f"{weight.dtype}, not {_FP8_E4M3_TAG}"
                )
        elif block is not None and info.dtype.startswith(_FP8_TAG_PREFIX):
            if info.dtype != _FP8_E4M3_TAG:
                raise CheckpointError(f"tensor {name!r} is stored as {info.dtype} but fmt is e4m3")
            fused = name.endswith(_FUSED_EXPERTS) and len(info.shape) == 3
            if not fused and (not name.endswith(".weight") or len(info.shape) != 2):
                raise CheckpointError(
                    f"FP8 tensor {name!r} of shape {list(info.shape)} is neither a 2-D '.weight' nor a 3-D fused "
                    "expert tensor; cannot use it"
                )
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                raise CheckpointError(f"FP8 weight {name!r} has no scale {name + SCALE_SUFFIX!r}")
            expected = scale_shape(info.shape[-2:], block)
            if fused and name.endswith(".gate_up_proj"):  # gate and up blocked apart: 2 x ceil(I / bn) rows
                expected = (2 * scale_shape((info.shape[1] // 2, 1), block)[0], expected[1])
            if fused:
                expected = (info.shape[0], *expected)
            if scale.shape != expected:
                raise CheckpointError(
                    f"FP8 scale {name + SCALE_SUFFIX!r} has shape {list(scale.shape)}, "
                    f"expected {list(expected)} for weight {name!r} of shape {list(info.shape)} "
                    f"with block {list(block)}"
                )


def _get(handles: dict[Path, Any], info: _TensorInfo, name: str) -> torch.Tensor:
    try:
        return handles[info.file].get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from e


def fp8_modules(model_dir: str | os.PathLike) -> frozenset[str]:
    """Names of the modules whose weights the checkpoint stores in FP8, from the file headers alone: ``X`` for each
    ``X.weight_scale_inv``; a routed-expert module (``...mlp.experts``) for its per-expert or fused scales."""
    model_dir = Path(model_dir)
    files, index = _checkpoint_files(model_dir)
    with ExitStack() as stack:
        tensors, _ = _plan(files, index, stack)
    modules = set()
    for name in tensors:
        if _is_scale(name):
            module = name.removesuffix(SCALE_SUFFIX).removesuffix(".weight")
            m = _EXPERT_MODULE.match(module)
            modules.add(m["experts"] if m else module)
    return frozenset(modules)


def _dequantize(tensor: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    if tensor.dim() == 2:
        return dequantize_block_fp8(tensor, scale, block, dtype)
    if scale.shape[1] != scale_shape(tensor.shape[1:], block)[0]:  # a fused gate_up: gate and up blocked apart
        from nextserve.ops.fp8 import dequantize_w13

        return torch.stack([dequantize_w13(t, s, block).to(dtype) for t, s in zip(tensor, scale)])
    return torch.stack([dequantize_block_fp8(t, s, block, dtype) for t, s in zip(tensor, scale)])


def iter_checkpoint(
    model_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    keep_fp8: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every logical tensor of the checkpoint in ``model_dir`` as (name, tensor).

    ``dtype`` casts floating-point tensors (others are left alone). An FP8 weight ``X`` for which ``keep_fp8(X)``
    is true is yielded as stored, followed by its scale ``X_scale_inv``; other FP8 weights are dequantised to
    ``dtype``, or to bfloat16 when ``dtype`` is None. The progress bar shows only if ``progress`` and stderr is a
    tty.
    """
    model_dir = Path(model_dir)
    files, index = _checkpoint_files(model_dir)
    config = read_config(model_dir) if (model_dir / CONFIG_FILE).exists() else {}
    block = fp8_block_size(config)
    with ExitStack() as stack:
        tensors, handles = _plan(files, index, stack)
        _check_fp8(tensors, block)
        names = [n for n in tensors if not (block is not None and _is_scale(n))]
        # disable=None lets tqdm hide itself when stderr is not a terminal (CI, logs).
        bar = stack.enter_context(
            tqdm(total=len(names), desc="Loading weights", unit="tensor", disable=None if progress else True)
        )
        for name in names:
            info = tensors[name]
            tensor = _get(handles, info, name)
            if block is not None and info.dtype == _FP8_E4M3_TAG:
                scale_name = name + SCALE_SUFFIX
                scale = _get(handles, tensors[scale_name], scale_name)
                if keep_fp8 is not None and keep_fp8(name):
                    bar.update(1)
                    yield name, tensor
                    yield scale_name, scale
                    continue
                tensor = _dequantize(tensor, scale, block, dtype or torch.bfloat16)
            elif dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            bar.update(1)
            yield name, tensor
