"""Tensor parallelism on one GPU: two ranks over gloo share the card, which checks the sharded kernels (Triton, fla)
against TP1 without a second GPU (issue 15, must-show 2). Not a deployment: gloo stages collectives through the host.
"""

import pytest
import torch

from nextserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
PROMPTS = [list(range(100, 164)), list(range(2000, 2021))]


def greedy(path, tp: int, **kw) -> list[list[int]]:
    kw = dict(kw, device="cuda:0", disable_tqdm=True, mem_fraction_static=0.3, disable_cuda_graph=True)
    if tp > 1:
        kw |= dict(tp_size=tp, dist_backend="gloo")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model=str(path), **kw) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_tp2_on_one_gpu_equals_tp1_on_a_tiny_config(tiny_model_dir):
    assert torch.cuda.is_available()
    assert greedy(tiny_model_dir, 2, dtype="float32") == greedy(tiny_model_dir, 1, dtype="float32")


def test_tp2_on_one_gpu_equals_tp1_on_a_4_layer_80b_slice(tmp_path):
    from nextserve.cli import main

    assert main(["bench", "config", "--num-layers", "4", "--out", str(tmp_path)]) == 0
    kw = dict(load_format="dummy", dtype="bfloat16", context_length=1024)
    assert greedy(tmp_path, 2, **kw) == greedy(tmp_path, 1, **kw)
