"""What the engine hands back for a request: cumulative per-sequence outputs, in vLLM's shapes.

One `RequestOutput` is produced per engine step in which the request made progress (only the final one for a
request added with `stream=False`, as `LLM.generate` adds them). Each of its
`CompletionOutput`s (one per sample when `n` > 1) is cumulative: `text` and `token_ids` hold everything generated
so far, so a streaming consumer computes deltas by remembering how much of each index it has sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one generated token, with the `top` alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # None unless SamplingParams.logprobs was set; one entry per generated token.
    logprobs: list[TokenLogprob] | None = None
    # None while running; then "stop" (EOS, stop string or stop id) , "length" or "abort".
    finish_reason: str | None = None
    # The stop string or stop token id that ended the sequence, if any.
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # Prompt tokens served from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens).
    num_cached_tokens: int = 0
    # None unless SamplingParams.prompt_logprobs was set; then one entry per prompt token, None for the first
    # (nothing predicts it). Complete once the prompt is prefilled.
    prompt_logprobs: list[TokenLogprob | None] | None = None
