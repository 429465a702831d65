"""Chat completions: messages to a prompt through the chat template, engine outputs to OpenAI chat responses.

Pure transformation, no HTTP and no engine: `render_prompt` builds the prompt text, `ChatJob` holds what one
request needs to shape its answer, `chat_response` turns the final `RequestOutput` into a `chat.completion` and
`chat_stream` turns the stream of cumulative outputs into `chat.completion.chunk` server-sent events.

Parsing order per choice: the reasoning parser splits the text into `reasoning_content` and content; the tool-call
parser then takes tool calls out of the content. tool_choice follows vLLM: "none" still renders the tools into the
prompt but nothing is parsed; "auto" parses whatever calls the model writes; "required" and a named function are
enforced by a grammar (`output_constraint`) in the model's own format, one or more `<tool_call>\n{"name": ...,
"arguments": {...}}\n</tool_call>` blocks separated by "\n" (exactly one with parallel_tool_calls=false or a named
function), each call's arguments matching its function's JSON schema. With a thinking prompt (the template opened
`<think>`) any constraint starts after `</think>`: the reasoning is free.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jinja2

from nextserve.outputs import CompletionOutput, RequestOutput
from nextserve.sampling_params import StructuredOutput
from nextserve.server.parsers import (
    ContentDelta,
    Qwen3ReasoningParser,
    Qwen3ReasoningStream,
    QwenToolCallParser,
    QwenToolCallStream,
    StreamEvent,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    finish_reason,
)
from nextserve.server.parsers.reasoning import THINK_END
from nextserve.server.parsers.tool_calls import TOOL_CALL_END, TOOL_CALL_START
from nextserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    TokenText,
    sse,
    usage,
)

# Arguments of apply_chat_template that the server sets itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tools", "add_generation_prompt", "tokenize", "return_dict"}


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    return d


def render_prompt(tokenizer: Any, req: ChatCompletionRequest) -> str:
    """The prompt text: the messages (and tools) through the model's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError("this model has no chat template; use /v1/completions with a raw prompt")
    kwargs = dict(req.chat_template_kwargs or {})
    if clash := sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys()):
        raise APIError(f"chat_template_kwargs may not set {clash}", param="chat_template_kwargs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    messages = [_message_dict(m) for m in req.messages]
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        # Templates reject conversations they cannot render (raise_exception); that is the client's input.
        raise APIError(f"the chat template could not render these messages: {e}", param="messages") from None


def output_constraint(
    req: ChatCompletionRequest, reasoning: Qwen3ReasoningParser | None
) -> tuple[StructuredOutput, str] | None:
    """The grammar this chat request's output must follow, and the field that asked for it: tool_choice
    "required" or named (tool calls), else response_format / structured_outputs / guided_*. With a reasoning parser
    and a prompt that opened `<think>`, it applies after `</think>`."""
    if req.forces_tool_calls:
        found: tuple[StructuredOutput, str] | None = (_tool_calls_grammar(req), "tool_choice")
    else:
        found = req.structured_output()
    if found is not None and reasoning is not None and reasoning.prompt_opened_think:
        found = dataclasses.replace(found[0], start_after=THINK_END), found[1]
    return found


def _tool_calls_grammar(req: ChatCompletionRequest) -> StructuredOutput:
    """An xgrammar structural tag: `<tool_call>` blocks, each a call of one of the allowed tools in Qwen's format."""
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    tags = []
    for tool in req.tools or []:
        fn = tool.function
        if named is not None and fn.name != named:
            continue
        schema = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        tags.append(
            {
                "type": "tag",
                "begin": f'{TOOL_CALL_START}\n{{"name": {json.dumps(fn.name, ensure_ascii=False)}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": schema},
                "end": f"}}\n{TOOL_CALL_END}",
            }
        )
    one = named is not None or req.parallel_tool_calls is False
    fmt = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": one,
    }
    return StructuredOutput(structural_tag={"type": "structural_tag", "format": fmt})


@dataclass
class ChatJob:
    """One chat request after validation: identity, options and the per-request parsers."""

    request_id: str
    created: int
    model: str
    n: int
    logprobs: bool
    include_usage: bool
    reasoning: Qwen3ReasoningParser | None = None
    tools: QwenToolCallParser | None = None
    token_text: TokenText | None = None

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI sends usage: null on every chunk but the final usage chunk
        body.update(extra)
        return body

    def logprobs_of(self, out: CompletionOutput, start: int = 0) -> dict[str, Any] | None:
        if not self.logprobs or out.logprobs is None:
            return None
        assert self.token_text is not None, "logprobs need the tokenizer"
        return {"content": self.token_text.chat_logprobs(out.logprobs[start:])}


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _usage_of(final: RequestOutput) -> dict[str, Any]:
    completion = sum(len(o.token_ids) for o in final.outputs)
    return usage(len(final.prompt_token_ids), completion, final.num_cached_tokens)


def chat_response(job: ChatJob, final: RequestOutput) -> dict[str, Any]:
    """The `chat.completion` body for a finished request."""
    choices = []
    for out in sorted(final.outputs, key=lambda o: o.index):
        reasoning, content = job.reasoning.parse(out.text) if job.reasoning else (None, out.text)
        calls = []
        if job.tools is not None and content:
            content, calls = job.tools.parse(content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if job.reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [_tool_call_dict(c) for c in calls]
        choices.append(
            {
                "index": out.index,
                "message": message,
                "logprobs": job.logprobs_of(out),
                "finish_reason": finish_reason(calls, out.finish_reason),
                "stop_reason": out.stop_reason,
            }
        )
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": _usage_of(final),
    }


@dataclass
class _ChoiceStream:
    """Streaming state of one choice: what was sent, and the parsers' incremental state."""

    job: ChatJob
    sent_chars: int = 0
    sent_tokens: int = 0
    done: bool = False
    reasoning: Qwen3ReasoningStream | None = None
    tools: QwenToolCallStream | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # completed calls, known once the output ends

    def __post_init__(self) -> None:
        if self.job.reasoning is not None:
            self.reasoning = self.job.reasoning.stream()
        if self.job.tools is not None:
            self.tools = self.job.tools.stream()

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """The chunk delta for new text (plus whatever the parsers release when `final`)."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r, c = self.reasoning.finish()
                reasoning, content = reasoning + r, content + c
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if self.tools is not None:
            events = self.tools.feed(content)
            if final:
                events += self.tools.finish()
                self.tool_calls = self.tools.tool_calls
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            if calls := _tool_call_deltas(events):
                delta["tool_calls"] = calls
        if content:
            delta["content"] = content
        return delta


def _tool_call_deltas(events: list[StreamEvent]) -> list[dict[str, Any]]:
    """OpenAI `delta.tool_calls` entries: one per call index, the first carrying id and name."""
    by_index: dict[int, dict[str, Any]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            by_index[e.index] = {
                "index": e.index,
                "id": e.id,
                "type": "function",
                "function": {"name": e.name, "arguments": ""},
            }
        elif isinstance(e, ToolCallArgsDelta):
            entry = by_index.setdefault(e.index, {"index": e.index, "function": {"arguments": ""}})
            entry["function"]["arguments"] += e.arguments
    return list(by_index.values())


async def chat_stream(job: ChatJob, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Server-sent events for a streaming chat request, ending with the usage chunk (if asked) and [DONE]."""
    choices = [_ChoiceStream(job) for _ in range(job.n)]
    for i in range(job.n):
        # The first chunk of each choice announces the role, as OpenAI does.
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse(job.chunk([first]))
    final: RequestOutput | None = None
    async for out in outputs:
        final = out
        for o in out.outputs:
            state = choices[o.index]
            if state.done:
                continue
            text = o.text[state.sent_chars :]
            state.sent_chars = max(state.sent_chars, len(o.text))  # cumulative text only grows: never resend
            logprobs = job.logprobs_of(o, state.sent_tokens)
            state.sent_tokens = len(o.token_ids)
            state.done = o.finished
            delta = state.delta(text, final=o.finished)
            reason = finish_reason(state.tool_calls, o.finish_reason) if o.finished else None
            if not delta and reason is None and not (logprobs and logprobs["content"]):
                continue  # the parsers are holding text back (a possible partial tag): nothing to send yet
            choice = {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            if o.finished:
                choice["stop_reason"] = o.stop_reason
            yield sse(job.chunk([choice]))
    if job.include_usage and final is not None:
        yield sse(job.chunk([], usage=_usage_of(final)))
    yield sse("[DONE]")
