"""Files shipped inside the package: the tiny built-in Qwen3-Next model.

``DEFAULT_MODEL_DIR`` is a Hugging Face-style model folder (config.json, generation_config.json, tokenizer files
with a ChatML chat template, model.safetensors) that ``nextserve serve`` / ``generate`` use when no ``--model`` is
given, so both work offline on a fresh machine. It is rebuilt by ``scripts/make_tiny_model.py``; see its README.md.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "tiny-qwen3-next"


def default_model_path() -> str:
    """Path of the built-in model folder, as a string for APIs that take a model name or path."""
    return str(DEFAULT_MODEL_DIR)
