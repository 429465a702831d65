"""Per-request sampling controls, with vLLM's field names and meanings.

`SamplingParams` is validated on construction (ValueError with a message naming the field). The five fields
that a model's generation_config.json may set (temperature, top_p, top_k, min_p, repetition_penalty) default
to None, meaning "not set by the user"; `resolved(defaults)` fills them from that config and then from vLLM's
neutral values, and the sampler only accepts resolved params. `stop` and `stop_token_ids` become lists.

`StructuredOutput` (the `structured` field) constrains the output to a JSON schema, any JSON object, a regex, one of
several strings, an EBNF grammar or an xgrammar structural tag (vLLM's `StructuredOutputsParams`); the engine
compiles it with xgrammar (`engine/structured.py`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Neutral value of each field a generation config may set: applying it changes nothing.
_NEUTRAL: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,  # 0 (or -1) disables top-k
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}

MAX_LOGPROBS = 20
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of the constraint fields, vLLM's names.

    json            a JSON schema (dict or JSON text); the output is one JSON value of that schema
    json_object     True: any JSON object
    regex           a regular expression the whole output matches
    choice          the output is exactly one of these strings
    grammar         an EBNF grammar (xgrammar's dialect, GBNF-like, root rule `root`)
    structural_tag  an xgrammar structural tag (dict or JSON text), e.g. tool calls between tags

    `start_after`: the constraint applies only after this token (its text, e.g. "</think>": the reasoning block of a
    thinking model is free, the answer is constrained), and up to two newlines may come first; before it the output
    is unconstrained. It must be one token.
    """

    json: dict[str, Any] | bool | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None
    start_after: str | None = None

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid structured output: {msg}")

        given = [n for n in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            fail(f"exactly one of json, json_object, regex, choice, grammar, structural_tag must be set, got {given}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                fail("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    json.loads(value)
                except ValueError as e:
                    fail(f"{name} is not valid JSON: {e}")
        for name in ("regex", "grammar", "start_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                fail(f"{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(n for n in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, n) is not None)

    def key(self) -> tuple[str, str, str | None]:
        """(kind, spec as text, start_after): what a compiled grammar is cached by. JSON keeps its key order (the
        order in which a schema's properties are generated), so equal schemas written in another order compile
        separately."""
        kind = self.kind
        spec: Any = {"json_object": True}.get(kind, getattr(self, kind))
        if isinstance(spec, str):
            text = spec
        else:
            text = json.dumps(list(spec) if kind == "choice" else spec, ensure_ascii=False, separators=(",", ":"))
        return kind, text, self.start_after


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    # None: generate until EOS, a stop condition or the model's context length. 0: generate nothing (with
    # prompt_logprobs: score the prompt only, lm-evaluation-harness' loglikelihood requests).
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Number of top alternatives to return besides the sampled token; 0 returns only the sampled token's.
    logprobs: int | None = None
    # Log-probability of every prompt token after the first (vLLM's field), with this many top alternatives.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Guided decoding: the output must match this (a JSON schema, regex, ...). None: free text.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid sampling parameters: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature is not None and not self.temperature >= 0:
            fail(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < -1):
            fail(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not -2 <= self.presence_penalty <= 2:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2 <= self.frequency_penalty <= 2:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            fail(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            fail(f"max_tokens must be an integer >= 0 or None, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            fail(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                fail(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                fail(f"stop_token_ids must be non-negative integers, got {t!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            fail(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")

    def resolved(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """A copy with every unset field taken from `defaults` (generation_config.json keys), then neutral.

        Other keys of `defaults` (do_sample, eos_token_id, ...) are ignored. top_k = -1 becomes 0.
        """
        defaults = defaults or {}
        values = {}
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            if value is None:
                value = neutral
            values[name] = value
        if values["top_k"] == -1:
            values["top_k"] = 0
        # replace() re-runs __post_init__, so values taken from a model's config are validated too.
        return dataclasses.replace(self, **values)

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in _NEUTRAL)

    @property
    def penalized(self) -> bool:
        """Whether sampling reads the token history (presence, frequency or repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty not in (None, 1.0))

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax: temperature 0 (below 1e-5, as vLLM: dividing by a tinier one would
        overflow the logits) or top_k 1; an unset field counts as neutral."""
        return (self.temperature is not None and self.temperature < _GREEDY_TEMPERATURE) or self.top_k == 1
