"""Capacity planning: weight bytes from the config, the refusal when they cannot fit, slot/page budgets."""

import pytest
import torch

from nextserve.engine.memory import check_weights_fit, weight_bytes
from nextserve.model_config import ModelConfig

GiB = 2**30


def test_weight_bytes_of_the_80b_geometry_and_the_refusal():
    full = ModelConfig.from_dict({})  # the 80B-A3B defaults: 48 layers
    need = weight_bytes(full, torch.bfloat16, with_mtp=False)
    assert need == 79_674_391_296 * 2  # spec section 1: the main model's parameter count, in bf16
    with pytest.raises(ValueError, match=r"the weights need 148\.4 GiB in bfloat16, but this GPU has 79\.2 GiB"):
        check_weights_fit(need, free=78 * GiB, total=int(79.2 * GiB), fraction=0.85, dtype=torch.bfloat16)
    twelve = ModelConfig.from_dict({"num_hidden_layers": 12})
    check_weights_fit(weight_bytes(twelve, torch.bfloat16, False), 78 * GiB, int(79.2 * GiB), 0.85, torch.bfloat16)


def test_mtp_head_adds_its_parameters():
    cfg = ModelConfig.from_dict({})
    extra = weight_bytes(cfg, torch.bfloat16, True) - weight_bytes(cfg, torch.bfloat16, False)
    assert extra == 1_650_471_424 * 2  # spec section 1: the MTP parameter count


def test_running_requests_never_exceed_state_slots(tiny_model_dir):
    """--max-running-requests above the slot count would hand out slots the pool does not have: it is capped."""
    from nextserve import LLM, SamplingParams

    llm = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        disable_tqdm=True,
        max_mamba_cache_size=2,
        max_running_requests=10,
    )
    assert llm.engine.capacity.max_running == 2
    outs = llm.generate([[5, 6, 7]] * 6, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    llm.engine.check_integrity()
