"""Checkpoint loading: safetensors reading, FP8 block dequantisation, a writer for synthetic checkpoints."""

from nextserve.loader.checkpoint import CheckpointError, fp8_block_size, iter_checkpoint, read_config
from nextserve.loader.fp8 import dequantize_block_fp8, quantize_block_fp8, scale_shape
from nextserve.loader.writer import write_checkpoint

__all__ = [
    "CheckpointError",
    "dequantize_block_fp8",
    "fp8_block_size",
    "iter_checkpoint",
    "quantize_block_fp8",
    "read_config",
    "scale_shape",
    "write_checkpoint",
]
