"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat path.

A request becomes a chat request (responses_request.py: `instructions` a system message, the stored conversation
of `previous_response_id`, then the `input` items), rendered with the chat template and answered by the engine as
chat is; sampling, tool_choice and the context checks are the chat endpoint's own.

The output is shaped by one builder (`_Output`) for both modes: the reasoning parser splits the text, the tool-call
parser takes `<tool_call>` blocks out of the content, and each change of kind closes the current output item and
opens the next: a `reasoning` item, a `message` item with one `output_text` part, one `function_call` item per
call. Streaming sends the events of OpenAI's reference as they happen (`response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta` / `response.reasoning_text.delta`, `response.function_call_arguments.delta`, their
`.done` events, `response.output_item.done`, then `response.completed` or `response.incomplete`), each with a
`sequence_number`; a non-streamed request feeds the whole text at once and returns the final response object.

`ResponseStore` keeps finished responses (their items) for `previous_response_id` and `GET /v1/responses/{id}`, in
memory for the server's lifetime, the least recently used dropped beyond its capacity.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nextserve.outputs import RequestOutput
from nextserve.server.chat import output_constraint, render_prompt
from nextserve.server.parsers import (
    ContentDelta,
    Qwen3ReasoningParser,
    Qwen3ReasoningStream,
    QwenToolCallParser,
    QwenToolCallStream,
    ToolCallArgsDelta,
    ToolCallStart,
)
from nextserve.server.protocol import APIError, new_id, now, sse
from nextserve.server.responses_request import (
    ITEMS,
    NamedFunction,
    ResponsesRequest,
    input_items,
    to_chat_request,
)

# Finished responses kept for previous_response_id; beyond this the oldest are forgotten.
STORE_CAPACITY = 1024


# ---- the store ----------------------------------------------------------------------------------------------
@dataclass
class StoredResponse:
    body: dict[str, Any]
    items: list[Any]  # the conversation through this response: history, input and output items


class ResponseStore:
    """Finished responses by id, least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        stored = self._items.get(response_id)
        if stored is None:
            raise APIError(f"no response with id {response_id!r} is stored", status=404, param=param, code="not_found")
        self._items.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._items[response_id] = stored
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


# ---- outputs ------------------------------------------------------------------------------------------------
class _Output:
    """Output items and their stream events, from reasoning text, content text and tool-call events in order."""

    def __init__(self, tools: QwenToolCallStream | None) -> None:
        self.items: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # taken by the streamer as they come
        self._tools = tools
        self._open: dict[str, Any] | None = None  # the item being written
        self._calls: dict[int, int] = {}  # tool-call index -> output index of its function_call item

    def _event(self, type: str, **fields: Any) -> None:
        self.events.append({"type": type, **fields})

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict[str, Any]) -> None:
        self.close()
        self.items.append(item)
        self._open = item
        self._event("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item))

    def reasoning(self, text: str) -> None:
        if not text:
            return
        if self._open is None or self._open["type"] != "reasoning":
            self._start(
                {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            )
            self._part({"type": "reasoning_text", "text": ""})
        self._open["content"][0]["text"] += text
        self._event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)

    def content(self, text: str) -> None:
        if self._open is None or self._open["type"] != "message":
            text = text.lstrip()  # whitespace between items (after </think>, around blocks) starts no message
            if not text:
                return
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            self._start(item)
            self._part({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self._open["content"][0]["text"] += text
        self._event("response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[])

    def call_start(self, index: int, call_id: str, name: str) -> None:
        item = {"id": new_id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": ""}
        item["status"] = "in_progress"
        self._start(item)
        self._calls[index] = len(self.items) - 1

    def call_arguments(self, index: int, delta: str) -> None:
        at = self._calls[index]
        item = self.items[at]
        item["arguments"] += delta
        self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=delta)

    def _part(self, part: dict[str, Any]) -> None:
        self._open["content"].append(part)
        self._event("response.content_part.added", **self._where(), content_index=0, part=dict(part))

    def close(self, status: str = "completed") -> None:
        """End the open item (the next one starts, or the output ended with `status`)."""
        item, self._open = self._open, None
        if item is None:
            return
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if item["type"] == "function_call":
            if self._tools is None or item["call_id"] not in {c.id for c in self._tools.tool_calls}:
                status = "incomplete"  # a block that never became a valid call
            self._event(
                "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
            )
        else:
            part = item["content"][0]
            if item["type"] == "message":
                self._event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            else:
                self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            self._event("response.content_part.done", **where, content_index=0, part=dict(part))
        item["status"] = status
        self._event("response.output_item.done", output_index=where["output_index"], item=_copy(item))


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


@dataclass
class ResponseJob:
    """One Responses request after validation: what shapes its answer, and where it is stored."""

    request: ResponsesRequest
    model: str
    prompt_ids: list[int]
    history: list[Any]  # the stored conversation before this request's input
    tokenizer: Any
    store: ResponseStore
    reasoning: Qwen3ReasoningParser | None = None
    tools: QwenToolCallParser | None = None
    response_id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=now)

    def body(self, status: str, output: list[dict[str, Any]], final: RequestOutput | None) -> dict[str, Any]:
        req = self.request
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        error = {"code": "server_error", "message": "the engine aborted the request"} if status == "failed" else None
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else req.tool_choice
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning or {"effort": None, "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
            if req.text and req.text.format
            else {"format": {"type": "text"}},
            "tool_choice": tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": self._usage(final, output) if final is not None else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def _usage(self, final: RequestOutput, output: list[dict[str, Any]]) -> dict[str, Any]:
        generated = final.outputs[0].token_ids
        reasoning_tokens = 0
        if any(item["type"] == "reasoning" for item in output):
            # Tokens through </think> (all of them if it never came).
            end = self.tokenizer.convert_tokens_to_ids("</think>")
            reasoning_tokens = generated.index(end) + 1 if end in generated else len(generated)
        prompt, completion = len(final.prompt_token_ids), len(generated)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + completion,
        }

    def _output(self) -> tuple[_Output, Qwen3ReasoningStream | None, QwenToolCallStream | None]:
        tools = self.tools.stream() if self.tools else None
        return _Output(tools), self.reasoning.stream() if self.reasoning else None, tools

    @staticmethod
    def _feed(
        out: _Output, reasoning: Qwen3ReasoningStream | None, tools: QwenToolCallStream | None, text: str, final: bool
    ) -> None:
        r, content = reasoning.feed(text) if reasoning else ("", text)
        if final and reasoning:
            r2, c2 = reasoning.finish()
            r, content = r + r2, content + c2
        out.reasoning(r)
        events = tools.feed(content) if tools else [ContentDelta(content)]
        if final and tools:
            events += tools.finish()
        for e in events:
            if isinstance(e, ContentDelta):
                out.content(e.text)
            elif isinstance(e, ToolCallStart):
                out.call_start(e.index, e.id, e.name)
            elif isinstance(e, ToolCallArgsDelta):
                out.call_arguments(e.index, e.arguments)

    def _finish(self, out: _Output, final: RequestOutput) -> dict[str, Any]:
        status = {"length": "incomplete", "abort": "failed"}.get(final.outputs[0].finish_reason or "", "completed")
        out.close("incomplete" if status == "incomplete" else "completed")
        body = self.body(status, out.items, final)
        if self.request.store:
            # The conversation so far, for a later previous_response_id; calls that never completed are left out.
            valid = [i for i in out.items if i["type"] != "function_call" or i["status"] == "completed"]
            items = self.history + input_items(self.request) + ITEMS.validate_python(valid)
            self.store.put(self.response_id, StoredResponse(body, items))
        return body

    def response(self, final: RequestOutput) -> dict[str, Any]:
        """The response object for a finished, non-streamed request."""
        out, reasoning, tools = self._output()
        self._feed(out, reasoning, tools, final.outputs[0].text, final=True)
        return self._finish(out, final)

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The server-sent events of a streamed request (no [DONE]: the Responses API ends with its last event)."""
        seq = 0

        def send(event: dict[str, Any]) -> str:
            nonlocal seq
            event["sequence_number"] = seq
            seq += 1
            return f"event: {event['type']}\n" + sse(event)

        start = self.body("in_progress", [], None)
        yield send({"type": "response.created", "response": start})
        yield send({"type": "response.in_progress", "response": start})
        out, reasoning, tools = self._output()
        sent = 0
        async for o in outputs:
            text = o.outputs[0].text
            self._feed(out, reasoning, tools, text[sent:], final=o.finished)
            sent = max(sent, len(text))
            if o.finished:
                body = self._finish(out, o)
            for event in out.events:
                yield send(event)
            out.events.clear()
            if o.finished:
                kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
                yield send({"type": kind.get(body["status"], "response.failed"), "response": body})


def start(srv: Any, req: ResponsesRequest) -> tuple[ResponseJob, Any, str | None]:
    """The job for `req`, the SamplingParams of its prompt (with the output constraint of `text.format` or a forced
    tool_choice, as on chat), and the field that constraint came from; `srv` is the app's shared state."""
    history = (
        srv.responses.get(req.previous_response_id, "previous_response_id").items if req.previous_response_id else []
    )
    try:
        chat_req = to_chat_request(req, history)
        parse_tools = bool(chat_req.tools) and chat_req.tool_choice != "none"
        if parse_tools and srv.tool_cls is None:
            raise APIError(
                "tools need the server to be started with --tool-call-parser (or tool_choice='none')", param="tools"
            )
        prompt = render_prompt(srv.tokenizer, chat_req)
        prompt_ids = srv.tokenizer.encode(prompt, add_special_tokens=False)
        reasoning = srv.reasoning_cls.from_prompt(prompt, tool_calls=parse_tools) if srv.reasoning_cls else None
        structured, field = output_constraint(chat_req, reasoning) or (None, None)
        params = srv.prepare(chat_req, prompt_ids, "input", structured)
    except APIError as e:
        e.param = responses_param(e.param)  # the chat checks name the chat fields: name what the client sent
        raise
    job = ResponseJob(
        request=req,
        model=srv.model_name,
        prompt_ids=prompt_ids,
        history=history,
        tokenizer=srv.tokenizer,
        store=srv.responses,
        reasoning=reasoning,
        tools=srv.tool_cls() if parse_tools else None,
    )
    return job, params, responses_param(field)


def responses_param(param: str | None) -> str | None:
    """The Responses field that a field of the chat request it became came from. Chat messages do not map one to
    one onto input items (instructions and previous_response_id's items come first), so every message is `input`."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    if param.startswith("max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith("response_format"):
        return "text.format" + param.removeprefix("response_format").removeprefix(".json_schema")
    if m := re.fullmatch(r"tools\[(\d+)\]\.function(.*)", param):  # chat tools nest what Responses tools hold flat
        return f"tools[{m[1]}]{m[2]}"
    return param
