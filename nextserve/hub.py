"""Hub ids as model names: `Qwen/Qwen3-Next-80B-A3B-Instruct` becomes a snapshot folder in the Hugging Face cache.

`resolve_model(name, revision)` returns a local folder. An existing path is returned as is. Anything else shaped like
a hub id (`owner/name`) is looked up in the hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub`) at `revision` (default `main`); when it is not there it is downloaded, unless
`HF_HUB_OFFLINE` is set, which makes a missing model a `FileNotFoundError` that says so. Only the files an engine
reads are downloaded (config, tokenizer, chat template, safetensors). The engine itself only ever sees folders.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRUE = {"1", "on", "yes", "true"}
# What loading a checkpoint reads; the rest of a hub repo (READMEs, images, original PyTorch weights) is skipped.
_ENGINE_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(name: str) -> bool:
    """True for `owner/name` that is not an existing path (a local folder always wins)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def hub_cache_dir() -> str:
    """The hub cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return cache
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_model(name: str, revision: str | None = None) -> str:
    """A local folder for `name` (a folder, or a hub id resolved through the cache); see the module docstring."""
    if not is_hub_id(name):
        if revision is not None and not Path(name).exists():
            raise FileNotFoundError(f"--revision {revision} needs a hub id (owner/name); {name!r} is neither that")
        return name  # a path: the engine reports a missing folder itself
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise FileNotFoundError(
            f"{name}{at} is not a local folder and is not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded: download it first (hf download {name}) or pass a folder to --model"
        )
    logger.info("downloading %s%s from the Hugging Face hub into %s", name, at, cache)
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache, allow_patterns=_ENGINE_FILES)
    except Exception as e:  # network down, unknown repo or revision, gated repo without a token...
        raise FileNotFoundError(
            f"{name}{at}: not in the Hugging Face cache ({cache}) and the download failed: {e}"
        ) from None
