"""Guided decoding on a GPU: the CUDA mask (table unpack + masked_fill) equals xgrammar's CPU kernel on random
bitmasks at the real vocabulary size, and constrained outputs on the GPU (with NEXTN too) are valid."""

import json

import pytest
import torch
from schema_check import SCHEMAS, validate

from nextserve import LLM, SamplingParams, StructuredOutput
from nextserve.engine.structured import apply_token_bitmask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("vocab", [1344, 151936, 151936 - 5])
def test_cuda_mask_equals_cpu_kernel(vocab):
    g = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (7, -(-vocab // 32)), dtype=torch.int32, generator=g)
    bitmask[2] = -1  # an unconstrained row
    logits = torch.randn(7, vocab, generator=g)
    cpu = logits.clone()
    apply_token_bitmask(cpu, bitmask)
    gpu = logits.cuda()
    apply_token_bitmask(gpu, bitmask.cuda())
    assert torch.equal(gpu.cpu(), cpu)


def test_constrained_outputs_on_gpu(tiny_mtp_model_dir):
    """Valid on the GPU, with and without NEXTN; the first tokens equal the CPU's (fp32 differs in the last bits
    between the devices, so a near-tie may flip a later token: see test_gpu_engine)."""
    params = SamplingParams(temperature=0, max_tokens=200, structured=StructuredOutput(json=SCHEMAS[1]))
    prompts = ["ROMEO:", "JULIET: O", "x"]

    def run(**kw):
        llm = LLM(model=str(tiny_mtp_model_dir), dtype="float32", disable_tqdm=True, mem_fraction_static=0.3, **kw)
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        llm.engine.check_integrity()
        return outs

    cpu = run(device="cpu", cpu_cache_bytes=64 << 20)
    for outs in (run(device="cuda"), run(device="cuda", speculative_algorithm="NEXTN", speculative_num_steps=2)):
        for c, d in zip(cpu, outs):
            validate(json.loads(d.text), SCHEMAS[1])
            assert d.token_ids[:4] == c.token_ids[:4]
