"""/v1/responses with the official openai client: a function-tool round trip through previous_response_id (over a
scripted engine that writes the <tool_call> block), streamed events that the SDK's own state machine accepts,
reasoning items, instructions, limits and errors; and plain text over the real engine, equal to chat's answer."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MODEL, LiveServer, real_engine_server
from .fake_engine import FakeEngine

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def prompt_of(engine: FakeEngine, response_id: str) -> str:
    return engine.tokenizer.decode(engine.records[response_id].prompt_token_ids)


def test_function_tool_round_trip(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script(CALL)
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    assert first.status == "completed" and [i.type for i in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}' and call.call_id.startswith("call")
    assert '"name": "get_weather"' in prompt_of(engine, first.id)  # the flat tool reached the template

    engine.script("It is sunny in Paris.")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER])
    assert second.status == "completed" and second.output_text == "It is sunny in Paris."
    assert second.previous_response_id == first.id
    prompt = prompt_of(engine, second.id)
    assert "Weather in Paris?" in prompt and '"city": "Paris"' in prompt
    assert prompt.endswith("<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

    # Stateless: the client sends the whole conversation itself; the model sees the same prompt.
    engine.script("It is sunny in Paris.")
    history = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True), result]
    third = client.responses.create(model=MODEL, input=history, tools=[WEATHER], store=False)
    assert engine.records[third.id].prompt_token_ids == engine.records[second.id].prompt_token_ids
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=third.id, input="again")  # store=false


def test_stream_events(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("<think>Paris, so weather.</think>\n\nLet me check." + "\n" + CALL)
    kw = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
    ):  # fmt: skip
        assert kind in kinds, kind
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "Paris, so weather."
    assert final.output_text == "Let me check."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check."
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == final.output[2].arguments == '{"city": "Paris"}'
    assert all(i.status == "completed" for i in final.output)
    assert final.usage.output_tokens > final.usage.output_tokens_details.reasoning_tokens > 0
    # The same output, not streamed.
    whole = client.responses.create(**kw)
    strip = lambda items: [i.model_dump(exclude={"id", "call_id"}, exclude_none=True) for i in items]  # noqa: E731
    assert strip(whole.output) == strip(final.output)
    # stream=True on create gives the raw events, which parse as the SDK's event types.
    raw = list(client.responses.create(stream=True, **kw))
    assert [e.type for e in raw] == kinds


def test_instructions_limits_and_retrieve(client: openai.OpenAI, engine: FakeEngine, server: LiveServer) -> None:
    engine.script("one two three four five six seven eight")
    r = client.responses.create(model=MODEL, input="Count.", instructions="Be brief.", max_output_tokens=3)
    assert prompt_of(engine, r.id).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.max_output_tokens == 3 and r.instructions == "Be brief."
    assert client.responses.retrieve(r.id).id == r.id
    # Instructions are not carried over through previous_response_id.
    engine.script("ok")
    r2 = client.responses.create(model=MODEL, input="Again.", previous_response_id=r.id)
    assert "Be brief." not in prompt_of(engine, r2.id) and "Count." in prompt_of(engine, r2.id)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi", "previous_response_id": "resp-nope"}, 404, "previous_response_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, None),
        ({"input": [{"type": "item_reference", "id": "x"}]}, 400, None),
        ({"input": []}, 400, "input"),
        ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
        # A tool output must answer a function call of the conversation (OpenAI refuses an orphan one too).
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, 400, "input"),
    ],
)
def test_bad_requests(server: LiveServer, body: dict, status: int, param: str | None) -> None:
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    yield from real_engine_server(tiny_model_dir, page_size=16)


def test_real_engine_text_equals_chat(real: LiveServer) -> None:
    with openai.OpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
        kw = dict(temperature=0, extra_body={"ignore_eos": True})
        r = client.responses.create(model=MODEL, input="Speak, ROMEO.", max_output_tokens=8, **kw)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Speak, ROMEO."}], max_tokens=8, **kw
        )
        assert r.status == "incomplete" and r.usage.output_tokens == 8
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        assert r.output_text == (chat.choices[0].message.content or "").lstrip()
        with client.responses.stream(model=MODEL, input="Speak, ROMEO.", max_output_tokens=8, **kw) as stream:
            events = list(stream)
        assert events[-1].type == "response.incomplete"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == r.output_text


@pytest.mark.parametrize(
    ("chat", "responses"),
    [
        ("messages[2].content[1].type", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("tools[1].function.parameters", "tools[1].parameters"),
        ("tool_choice", "tool_choice"),
        (None, None),
    ],
)
def test_chat_error_fields_named_as_sent(chat: str | None, responses: str | None) -> None:
    from nextserve.server.responses import responses_param

    assert responses_param(chat) == responses
