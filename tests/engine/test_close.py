"""LLM.close() / `with LLM(...)` / engine shutdown release the model, the pools and the CUDA graphs: engines made one
after another in one process do not pile up memory, even while their LLM objects are still referenced."""

import asyncio
import os

import pytest

from nextserve import LLM, SamplingParams

BUDGET = 128 << 20  # bytes of KV pages + state slots per engine


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _touched_llm() -> LLM:
    llm = LLM(disable_tqdm=True, cpu_cache_bytes=BUDGET)
    # Touch every page of the pools so that they count in the resident set.
    llm.engine.kv_pool.k.fill_(1.0)
    llm.engine.kv_pool.v.fill_(1.0)
    llm.engine.state_pool.ssm.fill_(1.0)
    assert llm.generate(["ROMEO:"], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    return llm


def test_five_engines_in_one_process_do_not_pile_up():
    kept = [_touched_llm()]
    kept[0].close()
    base = _rss()
    for _ in range(4):
        llm = _touched_llm()
        llm.close()
        kept.append(llm)  # still referenced, as in a notebook: close() must free anyway
    grown = _rss() - base
    assert grown < BUDGET, f"resident memory grew by {grown / 2**20:.0f} MiB over 4 closed engines"


def test_closed_engine_refuses_work_and_closes_twice():
    with LLM(disable_tqdm=True, cpu_cache_bytes=16 << 20) as llm:
        llm.generate(["ROMEO:"], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(["ROMEO:"], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.close()  # harmless


def test_async_engine_shutdown_closes_the_engine():
    from nextserve.config import EngineConfig
    from nextserve.engine.async_engine import AsyncEngine
    from nextserve.engine.engine import Engine

    engine = Engine(EngineConfig(disable_tqdm=True, cpu_cache_bytes=16 << 20))
    async_engine = AsyncEngine(engine)
    asyncio.run(async_engine.shutdown())
    assert engine.model is None and engine.kv_pool is None
