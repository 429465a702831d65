"""The OpenAI wire format: request models in, error bodies, usage, logprobs and SSE lines out.

Requests are parsed strictly from the raw JSON body (`parse_request`): a wrong type is an error, never a silent
coercion ("5" is not an integer), and unknown fields are ignored as OpenAI-compatible servers do. Every problem a
client can cause is raised as `APIError`, which the app turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Fields the client leaves out stay None so that `SamplingParams` carries "not set" to the engine, which fills them
from the model's generation_config.json. Responses are plain dicts built here and in the endpoint modules, because
OpenAI's shapes mix "present and null" with "absent" in ways a response model would blur.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nextserve.outputs import TokenLogprob
from nextserve.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutput

# OpenAI's own bound on n; larger values are almost always a client bug and each sample costs a state slot.
MAX_N = 128
# Integers that end up in device tensors must fit them; beyond this they only mean "everything" anyway.
_INT32_MAX = 2**31 - 1


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP status and the rest fills OpenAI's error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests -----------------------------------------------------------------------------------------------
class FieldError(ValueError):
    """A validation error about one field; `param` is its path relative to the model that raises it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    # strict: "5" is not an integer and 1 is not a bool. ignore: clients send fields we have no use for
    # (metadata, store, service_tier...); refusing them would break stock OpenAI clients.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's spec makes every optional field nullable, and clients (the SDKs, LangChain) send explicit
        # nulls: a null is the same as leaving the field out. A required field sent as null is then "missing".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


# Content part types of OpenAI's API that carry images (chat: image_url; Responses API: input_image).
_IMAGE_PARTS = {"image_url", "input_image", "image"}


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type in _IMAGE_PARTS:
            raise FieldError("images are not supported: Qwen3-Next is a text-only model", param="type")
        if self.type not in ("text", "input_text", "output_text"):
            raise FieldError(f"content parts of type {self.type!r} are not supported (text only)", param="type")
        if self.text is None:
            raise FieldError("a text content part needs a 'text' string", param="text")
        return self


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system role; the chat template only knows "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise FieldError(f"a {self.role} message needs 'content'", param="content")
        return self

    def text(self) -> str:
        """The content as one string; several text parts are joined by newlines."""
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content)
        return self.content or ""


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    # `schema` would shadow BaseModel.schema(): the wire name is an alias.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict[str, Any] | None = None  # structural_tag: xgrammar's format object (vLLM's response format)

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise FieldError("response_format of type 'json_schema' needs json_schema.schema", param="")
        if self.type == "structural_tag" and self.format is None:
            raise FieldError("response_format of type 'structural_tag' needs 'format'", param="")
        return self


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` object: one constraint."""

    # `json` would shadow BaseModel.json(): the wire name is an alias.
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


# Request fields that constrain the output, in the order they are checked: at most one may be set.
GUIDED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


class _SamplingRequest(_Strict):
    """Fields shared by chat and text completions: the model, streaming and every sampling control."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None
    # Guided decoding: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's extension: log-probabilities of the prompt tokens, with this many alternatives each.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _supported(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options is only allowed with stream=true", param="stream_options")
        if self.logit_bias:
            raise FieldError("logit_bias is not supported", param="logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of is not supported (it must be left out or equal n)", param="best_of")
        guided = [f for f in GUIDED_FIELDS if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            guided.remove("response_format")
        if len(guided) > 1:
            raise FieldError(f"only one of {', '.join(guided)} may be set", param=guided[1])
        if self.prompt_logprobs is not None and self.stream:
            # As vLLM: the prompt's scores come in one piece, there is nothing to stream.
            raise FieldError("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        return self

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """The output constraint this request asks for, and the field it came from (for error messages)."""
        try:
            rf = self.response_format
            if rf is not None and rf.type != "text":
                if rf.type == "json_object":
                    return StructuredOutput(json_object=True), "response_format"
                if rf.type == "structural_tag":
                    return StructuredOutput(structural_tag={"type": "structural_tag", "format": rf.format}), (
                        "response_format"
                    )
                assert rf.json_schema is not None and rf.json_schema.json_schema is not None
                return StructuredOutput(json=rf.json_schema.json_schema), "response_format"
            if (so := self.structured_outputs) is not None:
                fields = so.model_dump(exclude_none=True, by_alias=True)
                if fields.get("json_object") is False:
                    del fields["json_object"]
                return StructuredOutput(**fields), "structured_outputs"
            for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
                if getattr(self, name) is not None:
                    return StructuredOutput(**{kind: getattr(self, name)}), name
            if self.guided_grammar is not None:
                return StructuredOutput(grammar=self.guided_grammar), "guided_grammar"
        except ValueError as e:
            field = next(f for f in GUIDED_FIELDS if getattr(self, f) is not None)
            raise APIError(str(e), param=field) from None
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def wanted_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, structured: StructuredOutput | None = None
    ) -> SamplingParams:
        """SamplingParams for this request; unset generation-config fields stay None for the engine to resolve."""
        try:
            return SamplingParams(
                n=self.n,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=self.wanted_prompt_logprobs(),
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured=structured,
            )
        except ValueError as e:
            raise APIError(str(e), param=self.param_of(str(e))) from None

    def param_of(self, message: str) -> str | None:
        """The request field an engine-side validation message is about ("... min_tokens (5) must ...")."""
        words = re.findall(r"[a-z_]+", message.removeprefix("invalid sampling parameters: "))
        for word in words[:2]:
            if word == "stop" or word in type(self).model_fields:
                return word
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise FieldError("tool_choice 'required' or a named function needs 'tools'", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or []}:
                raise FieldError(
                    f"tool_choice names the function {name!r}, which is not in 'tools'", param="tool_choice"
                )
        if self.forces_tool_calls:
            guided = [f for f in GUIDED_FIELDS if getattr(self, f) is not None]
            if self.response_format is not None and self.response_format.type == "text":
                guided.remove("response_format")
            if guided:
                raise FieldError(
                    f"tool_choice 'required' or a named function is enforced by a grammar and cannot be combined "
                    f"with {guided[0]}",
                    param="tool_choice",
                )
        return self

    @property
    def forces_tool_calls(self) -> bool:
        """tool_choice "required" or a named function: the output must be tool calls (enforced by a grammar)."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 scores the prompt only (with echo + logprobs: lm-evaluation-harness' loglikelihood requests).
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    # vLLM's extension: logprob tokens as "token_id:<id>", so a client can continue from the exact ids.
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.suffix:
            raise FieldError("suffix is not supported", param="suffix")
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FieldError("prompt must not be empty", param="prompt")
        if any(isinstance(p, list) and min(p) < 0 for p in prompts):
            raise FieldError("prompt token ids must be non-negative", param="prompt")
        return self

    def wanted_prompt_logprobs(self) -> int | None:
        # echo + logprobs returns the prompt's tokens with their logprobs too, as OpenAI's legacy API did.
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The batch: one string or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


RequestT = TypeVar("RequestT", bound=_Strict)

# Names pydantic puts in an error location for the branch of a union; they are not request fields.
_BRANCH_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def parse_request(body: bytes, model: type[RequestT]) -> RequestT:
    """Validate a raw JSON body into `model`; any problem becomes a 400 APIError naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise APIError(f"the request body is not valid JSON: {errors[0]['msg']}") from None
        # A union (content: str | list[part]) reports one error per branch; our own checks say most.
        err = next((x for x in errors if isinstance(x.get("ctx", {}).get("error"), FieldError)), errors[0])
        own = err.get("ctx", {}).get("error")
        loc = (*err["loc"], *own.param.split(".")) if isinstance(own, FieldError) else err["loc"]
        param = _param_path(loc)
        msg = str(own) if isinstance(own, FieldError) else err["msg"].removeprefix("Value error, ")
        raise APIError(f"{param}: {msg}" if param else msg, param=param) from None


def _param_path(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item.isidentifier() and item.islower() and item not in _BRANCH_NAMES:
            path += f".{item}" if path else item
    return path or None


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, defaults: dict[str, Any], prompt_param: str
) -> int:
    """max_tokens for a prompt: the request's, else the config's max_new_tokens, else the rest of the context."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(
            f"the prompt has {prompt_len} tokens but this model's context length is {max_model_len}",
            code="context_length_exceeded",
            param=prompt_param,
        )
    if requested is None:
        default = defaults.get("max_new_tokens")
        return min(room, default) if isinstance(default, int) and default > 0 else room
    if requested > room:
        raise APIError(
            f"this model's context length is {max_model_len} tokens, but {prompt_len + requested} were requested "
            f"({prompt_len} in the prompt, {requested} for the completion); shorten the prompt or max_tokens",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return requested


# ---- responses ----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event; payloads are compact JSON, `[DONE]` goes as is."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class TokenText:
    """Text and raw bytes of single tokens, for logprobs; cached per id because the same tokens recur."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_of = _byte_level_decoder()

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id])
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            # A byte-level BPE piece spells its raw bytes one character per byte; a token that is half of a
            # UTF-8 character decodes to U+FFFD, so its true bytes come from the piece, not from `text`.
            if isinstance(piece, str) and piece and all(c in self._byte_of for c in piece) and "\ufffd" in text:
                raw = [self._byte_of[c] for c in piece]
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit

    def chat_logprobs(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """OpenAI chat `logprobs.content` entries."""
        out = []
        for e in entries:
            text, raw = self(e.token_id)
            top = []
            for tid, lp in e.top:
                t, b = self(tid)
                top.append({"token": t, "logprob": lp, "bytes": b})
            out.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return out

    def completion_logprobs(
        self, entries: list[TokenLogprob | int], text_offset: int, as_ids: bool = False
    ) -> dict[str, Any]:
        """OpenAI text-completion `logprobs`; offsets count from `text_offset` (where this piece starts).
        A bare token id is a token nothing scored (the first prompt token under echo): null logprob and top.
        With `as_ids`, tokens are spelled "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []

        def name(tid: int) -> str:
            return f"token_id:{tid}" if as_ids else self(tid)[0]

        for e in entries:
            tid = e if isinstance(e, int) else e.token_id
            tokens.append(name(tid))
            offsets.append(text_offset)
            text_offset += len(self(tid)[0])
            if isinstance(e, int):
                values.append(None)
                tops.append(None)
                continue
            values.append(_finite(e.logprob))
            top = {name(t): _finite(lp) for t, lp in e.top}
            top.setdefault(name(tid), _finite(e.logprob))  # "the most likely tokens, as well as the chosen one"
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs(self, entries: list[TokenLogprob | None]) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank,
        decoded_token}}, the prompt's own token first, then the top alternatives (rank 1 = most likely). The
        prompt token's rank is null when it is not among the alternatives (the engine does not rank the rest)."""
        out: list[dict[str, dict[str, Any]] | None] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            ranks = {tid: r for r, (tid, _) in enumerate(e.top, start=1)}
            entry = {str(e.token_id): self._scored(e.token_id, e.logprob, ranks.get(e.token_id))}
            for tid, lp in e.top:
                entry.setdefault(str(tid), self._scored(tid, lp, ranks[tid]))
            out.append(entry)
        return out

    def _scored(self, token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": self(token_id)[0]}


def _finite(logprob: float) -> float:
    # JSON has no -Infinity: OpenAI (and vLLM) send -9999.0 for a token the model rules out.
    return max(logprob, -9999.0)


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            # Bytes without a printable glyph are mapped past U+0100, in byte order.
            table[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in table.items()}
