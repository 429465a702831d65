import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Every engine a test makes (servers started as subprocesses too) checks page and slot ownership whenever it goes idle.
os.environ["NEXTSERVE_DEBUG_CHECK_INTEGRITY"] = "1"
# Tiny models: one thread beats two (no OpenMP hand-offs), and stays fast when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3-Next checkpoint (fp32 weights, built-in tokenizer), shared by the engine tests."""
    from tiny import engine_config, write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-model")
    write_tiny_checkpoint(path, engine_config())
    return path


@pytest.fixture(scope="session")
def tiny_mtp_model_dir(tmp_path_factory):
    """The tiny random checkpoint plus synthetic mtp.* weights (speculative decoding tests)."""
    from tiny import engine_config, write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-mtp-model")
    write_tiny_checkpoint(path, engine_config(), mtp=True)
    return path


@pytest.fixture(autouse=True)
def _gpu_fast_paths_present(request):
    """On a GPU machine a gpu-marked test fails, never skips, when a Triton module or fla-core is missing."""
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        from nextserve.ops import backends

        backends.select(torch.device("cuda"))  # raises, naming the package, when a fast path failed to import
