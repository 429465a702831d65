"""Offline API: `LLM(model=PATH, **engine_flags).generate(prompts, SamplingParams(...))`.

All prompts go through the continuous-batching engine at once; results come back in prompt order. Every engine
flag is a keyword argument (the flag in snake_case), as in vLLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from nextserve.config import EngineConfig
from nextserve.engine.tp import make_engine
from nextserve.outputs import RequestOutput
from nextserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **engine_kwargs):
        self.engine = make_engine(config or EngineConfig.from_kwargs(model=model, **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Frees the model, caches and CUDA graphs now (instead of whenever the garbage collector gets to them)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order: dict[str, int] = {}
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p, stream=False)
            order[rid] = len(order)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generate", disable=not use_tqdm or self.engine.config.disable_tqdm)
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]
