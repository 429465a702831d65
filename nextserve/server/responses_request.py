"""The Responses API's request (`ResponsesRequest`) and how it becomes a chat request.

Input items (messages, `reasoning`, `function_call`, `function_call_output`) become chat messages, consecutive
assistant items one assistant turn; `instructions` a system message first; flat function tools the chat shape. The
result goes through the chat request's own parser, so chat's checks and defaults apply unchanged.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter

from nextserve.server.protocol import _INT32_MAX, APIError, ChatCompletionRequest, ContentPart, _Strict, parse_request


# ---- the request -----------------------------------------------------------------------------------------------
def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text or "" for p in content)


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class _ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    content: list[_ReasoningText] | None = None
    summary: list[_ReasoningText] | None = None


def _item_kind(value: Any) -> str:
    # An "easy input message" ({"role", "content"}) has no type.
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]
ITEMS = TypeAdapter(list[InputItem])


class FunctionTool(_Strict):
    """The Responses API's flat function tool."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    store: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # effort / summary: accepted, echoed back; Qwen3-Next has no effort knob
    metadata: dict[str, str] | None = None
    user: str | None = None
    # vLLM's extensions, as on chat.
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# ---- input items to chat messages ---------------------------------------------------------------------------
def to_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Chat messages (ChatCompletionRequest's shape) for Responses items. Consecutive assistant items (reasoning,
    message, function calls: one turn of the model) become one assistant message."""
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None  # waits for the assistant message it belongs to
    calls: set[str] = set()  # call_ids of the function calls so far: an output must answer one (as OpenAI checks)

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"], reasoning = reasoning, None
        return last

    for item in items:
        if isinstance(item, ReasoningItem):
            parts = item.content or item.summary or []
            reasoning = "\n".join(p.text for p in parts)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            assistant().setdefault("tool_calls", []).append(call)
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise APIError(f"no function call found for function_call_output with call_id {item.call_id!r}",
                               param="input")  # fmt: skip
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        elif item.role == "assistant":
            msg = assistant()
            msg["content"] = (msg["content"] or "") + _text(item.content)
        else:
            messages.append({"role": item.role, "content": _text(item.content)})
    return messages


def input_items(req: ResponsesRequest) -> list[Any]:
    """The request's input as items: a string is one user message."""
    return [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else list(req.input)


def to_chat_request(req: ResponsesRequest, history: list[Any]) -> ChatCompletionRequest:
    """The chat request this Responses request amounts to; `history` holds the items of previous_response_id."""
    messages = to_messages(history + input_items(req))
    if req.instructions:  # not carried over through previous_response_id, as OpenAI does
        messages.insert(0, {"role": "system", "content": req.instructions})
    if not messages:
        raise APIError("input must not be empty", param="input")
    body: dict[str, Any] = {"messages": messages, "max_completion_tokens": req.max_output_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos"):
        body[name] = getattr(req, name)
    body["chat_template_kwargs"] = req.chat_template_kwargs
    body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools
        ]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    else:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    # Through the chat parser, so the chat endpoint's checks (and its error messages) apply unchanged.
    return parse_request(json.dumps(body).encode(), ChatCompletionRequest)
