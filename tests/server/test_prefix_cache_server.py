"""The served built-in model with its default flags (page size 16, snapshot interval 256): an identical prompt
sent again reuses all but its last page, as `usage.prompt_tokens_details.cached_tokens` reports, whatever its
length. The grid of snapshots alone reused 0 of 34, 256 of 377 and 1280 of 1348 tokens."""

from __future__ import annotations

import openai
import pytest
import torch

from nextserve.config import EngineConfig
from nextserve.engine.async_engine import AsyncEngine
from nextserve.engine.engine import Engine

from .conftest import MODEL, LiveServer


@pytest.fixture(scope="module")
def builtin():
    live = LiveServer(AsyncEngine(Engine(EngineConfig(device="cpu", disable_tqdm=True))))
    yield live
    live.stop()


@pytest.mark.parametrize("length", [34, 377, 1348])
def test_identical_prompt_reuses_all_but_its_last_page(builtin, length):
    page = builtin.engine.engine.config.page_size
    client = openai.OpenAI(base_url=builtin.url + "/v1", api_key="none")
    prompt = torch.randint(10, 1200, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The end-of-prompt snapshot sits at the last page boundary before the last token (recomputed for its logits).
    assert second.usage.prompt_tokens_details.cached_tokens >= length - page
    assert second.choices[0].text == first.choices[0].text
