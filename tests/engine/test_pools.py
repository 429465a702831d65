"""The KV-page and state-slot pools hand out each id once and refuse to take back one they did not hand out."""

import random

import pytest
import torch

from nextserve.engine.kv_pool import KVLayout, KVPool
from nextserve.engine.state_pool import StateLayout, StatePool


def _kv(n: int = 8) -> KVPool:
    return KVPool(KVLayout(1, 4, 1, 8, torch.float32), n, "cpu")


def _states(n: int = 4, scratch: int = 2) -> StatePool:
    return StatePool(StateLayout(1, 8, 4, 1, 4, 4, torch.float32, torch.float32), n, "cpu", num_scratch=scratch)


def test_kv_double_free_and_foreign_free_raise():
    kv = _kv()
    pages = kv.allocate(3)
    kv.free(pages[:1])
    with pytest.raises(RuntimeError, match=f"KV page {pages[0]} freed but not in use"):
        kv.free(pages[:1])
    with pytest.raises(RuntimeError, match="KV page 0 freed"):
        kv.free([0])  # the dummy page is never handed out
    kv.free(pages[1:])
    assert kv.num_free == kv.num_pages


def test_state_double_free_raises_for_working_and_scratch_slots():
    st = _states()
    slot = st.allocate()
    st.free(slot)
    with pytest.raises(RuntimeError, match=f"state slot {slot} freed but not in use"):
        st.free(slot)
    scratch = st.allocate_scratch()
    st.free_scratch([scratch])
    with pytest.raises(RuntimeError, match="scratch slot"):
        st.free_scratch([scratch])
    with pytest.raises(RuntimeError, match="state slot"):
        st.free(scratch)  # a scratch id is not a working slot even while it is handed out


def test_random_allocate_free_keeps_every_id_owned_once():
    rng = random.Random(0)
    kv, held = _kv(64), []
    for _ in range(3000):
        if held and (rng.random() < 0.5 or kv.num_free == 0):
            group = held.pop(rng.randrange(len(held)))
            kv.free(group)
            if rng.random() < 0.1:
                with pytest.raises(RuntimeError):
                    kv.free(group)
        else:
            n = rng.randint(1, min(4, kv.num_free))
            held.append(kv.allocate(n))
        owned = sorted(kv.free_pages() + [p for g in held for p in g])
        assert owned == list(range(1, 65))


def test_engine_checks_ownership_when_it_goes_idle(monkeypatch):
    from nextserve import LLM, SamplingParams

    monkeypatch.delenv("NEXTSERVE_DEBUG_CHECK_INTEGRITY", raising=False)
    params = SamplingParams(temperature=0, max_tokens=2)
    with LLM(disable_tqdm=True, cpu_cache_bytes=16 << 20, debug_check_integrity=True) as llm:
        llm.generate(["ROMEO:"], params, use_tqdm=False)
        llm.engine.kv_pool._free.pop()  # a page leaks: owned by no one
        with pytest.raises(AssertionError, match="KV pages leaked"):
            llm.generate(["ROMEO:"], params, use_tqdm=False)
    with LLM(disable_tqdm=True, cpu_cache_bytes=16 << 20) as llm:  # off: the same leak goes unnoticed
        llm.engine.kv_pool._free.pop()
        llm.generate(["ROMEO:"], params, use_tqdm=False)
