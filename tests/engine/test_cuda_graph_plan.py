"""CUDA-graph planning that needs no GPU: bucket sizes and when the engine falls back to eager decoding."""

import torch

from nextserve import LLM
from nextserve.engine.cuda_graph import bucket_sizes, supports_graphs


def test_bucket_sizes_cover_every_batch_with_little_padding():
    for max_batch in (1, 3, 20, 64, 256):
        sizes = bucket_sizes(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
        for b in range(1, max_batch + 1):
            bucket = next(s for s in sizes if s >= b)
            assert bucket - b < 8  # padded rows route to experts whose weights the step then reads


def test_cpu_engine_decodes_eagerly(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), device="cpu", disable_tqdm=True, cpu_cache_bytes=16 << 20)
    assert llm.engine.runner.graphs is None
    assert supports_graphs(llm.engine.model, torch.device("cpu")) == "not a CUDA device"
