"""The OpenAI-compatible HTTP app: routes, authentication, errors, and the one way requests reach the engine.

`build_app(engine, ...)` serves POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (and GET
/v1/responses/{id}, shaped in responses.py), GET /v1/models[/{id}],
GET /health and GET /metrics over any object with the `AsyncEngine` surface (tokenizer, max_model_len,
generation_defaults, generate, abort, stats). Contracts:

- Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for anything invalid a client
  can send (bad JSON, wrong types, out-of-range values, too long for the context, unsupported features), 401 for a
  missing or wrong bearer key on /v1 routes, 404 for an unknown model or route, 405 for a wrong method. A 500 means
  a server bug; it is logged with its traceback. Errors after a stream started are sent as a final `data:` event.
- A request ends in the engine exactly once: it finishes, or it is aborted when its client disconnects (streaming or
  not) or the handler fails. A client that disconnects while still sending its body never reached the engine: one
  DEBUG line, no error. `_Server.generate` is the only place that calls `engine.generate`, and it guarantees
  that (aclose + abort, shielded from the cancellation that a disconnect delivers).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nextserve.outputs import RequestOutput
from nextserve.sampling_params import SamplingParams, StructuredOutput
from nextserve.server import chat, responses
from nextserve.server.metrics import ServerMetrics
from nextserve.server.parsers import get_reasoning_parser, get_tool_call_parser
from nextserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenText,
    error_body,
    new_id,
    now,
    parse_request,
    resolve_max_tokens,
    sse,
    usage,
)
from nextserve.server.responses_request import ResponsesRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", ChatCompletionRequest, CompletionRequest, ResponsesRequest)

_STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}


def _on(parser: str | None) -> bool:
    return parser is not None and parser.strip().lower() not in ("", "none")


class _ClientGone(Exception):
    """The client disconnected before the response was ready."""


class _Server:
    """What the routes share: the engine, the served name, parsers, metrics."""

    def __init__(
        self,
        engine: Any,
        served_model_name: str,
        api_key: str | None,
        reasoning_parser: str | None,
        tool_call_parser: str | None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name
        self.api_key = api_key
        # Unknown parser names fail here, at start-up, with the list of known ones.
        # "none" turns a parser off, as leaving it out does.
        self.reasoning_cls = get_reasoning_parser(reasoning_parser) if _on(reasoning_parser) else None
        self.tool_cls = get_tool_call_parser(tool_call_parser) if _on(tool_call_parser) else None
        self.metrics = ServerMetrics(engine.stats)
        self.token_text = TokenText(self.tokenizer)
        self.responses = responses.ResponseStore()  # for /v1/responses' previous_response_id
        self.created = now()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("missing or incorrect API key", status=401, code="invalid_api_key")

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt_param: str = "prompt",
        structured_param: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """engine.generate with metrics, whose early exit (close, cancel, error) always aborts the request.
        `structured_param` names the field a structured-output constraint came from (a grammar that does not compile
        is a 400 about it)."""
        timer = self.metrics.timer()
        stream = self.engine.generate(request_id, prompt_ids, params)
        finished = started = False
        try:
            async for out in stream:
                timer.observe(out)
                started, finished = True, out.finished
                yield out
        except ValueError as e:
            if started:
                raise
            # The engine validates (and compiles grammars) before queueing; what it refuses is the client's request.
            message = str(e)
            param = structured_param if "structured output" in message else _engine_error_param(message, prompt_param)
            raise APIError(message, param=param) from None
        finally:
            if not finished:
                # NOTE: a disconnect arrives as cancellation, which anyio re-delivers at every await inside the
                # cancelled scope; the shield lets the engine hear about the abort.
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                    await self.engine.abort(request_id)

    def prepare(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        param: str,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        """SamplingParams for one prompt, with max_tokens checked against the context length."""
        if not prompt_ids:
            raise APIError("the prompt is empty after tokenization", param=param)
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in req.stop_token_ids or ()):
            # The sampler indexes logits by these ids (min_tokens masking): they must be real tokens.
            raise APIError(f"stop_token_ids must be token ids below {vocab}", param="stop_token_ids")
        max_tokens = resolve_max_tokens(
            req.requested_max_tokens(), len(prompt_ids), self.engine.max_model_len,
            self.engine.generation_defaults or {}, prompt_param=param,
        )  # fmt: skip
        logprobs = req.num_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
        return req.sampling_params(max_tokens, logprobs, structured)


def _echo_text(tok: Any, prompt: str | list[int]) -> str:
    """The prompt as echoed: as sent, or its token ids decoded (ids the tokenizer does not have are a 400)."""
    if isinstance(prompt, str):
        return prompt
    if any(not 0 <= t < len(tok) for t in prompt):
        raise APIError(f"prompt token ids must be integers in [0, {len(tok)})", param="prompt")
    return tok.decode(prompt)


def _engine_error_param(message: str, prompt_param: str) -> str | None:
    """The request field an engine refusal is about: the stop ids or, for anything else it checks, the prompt."""
    if "stop_token_ids" in message:
        return "stop_token_ids"
    return prompt_param if "prompt" in message else None


# ---- driving the engine from a request ----------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the aborts run before we return
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with aclosing(outputs):
        async for out in outputs:
            last = out
    assert last is not None and last.finished, "the engine ended a request without a finished output"
    return last


async def _all_last(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    tasks = [asyncio.ensure_future(_last(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        # One failure (or a disconnect) ends the batch: cancel the rest, which aborts them.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come, tagged with the index of their stream."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, out
    finally:
        with anyio.CancelScope(shield=True):
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for s in streams:
                await s.aclose()


async def _event_stream(
    request: Request, outputs: AsyncIterator[Any], render: Callable[[AsyncIterator[Any]], AsyncIterator[str]]
) -> StreamingResponse:
    """An SSE response. The first output is awaited before the headers go out, so a request the engine refuses
    still gets a proper 400; later errors become a final error event."""
    first = await _unless_disconnected(request, anext(outputs))

    async def replay() -> AsyncIterator[Any]:
        yield first
        async for out in outputs:
            yield out

    async def body() -> AsyncIterator[str]:
        try:
            async for line in render(replay()):
                yield line
            return
        except APIError as e:
            error = e.body()
        except Exception:
            logger.exception("error while streaming a response")
            error = error_body("internal server error", type="server_error", code="internal_error")
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()  # aborts the engine request unless it finished
        yield sse(error)
        yield sse("[DONE]")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# ---- text completions ---------------------------------------------------------------------------------------
def _completion_body(rid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra}


def _batch_usage(finals: list[RequestOutput]) -> dict[str, Any]:
    return usage(
        sum(len(f.prompt_token_ids) for f in finals),
        sum(len(o.token_ids) for f in finals for o in f.outputs),
        sum(f.num_cached_tokens for f in finals),
    )


async def _completions(srv: _Server, request: Request, req: CompletionRequest) -> Response:
    tok = srv.tokenizer
    prompts = [p if isinstance(p, list) else tok.encode(p) for p in req.prompts()]
    structured, field = req.structured_output() or (None, None)
    params = [srv.prepare(req, ids, "prompt", structured) for ids in prompts]
    rid, created = new_id("cmpl"), now()
    streams = [
        srv.generate(f"{rid}-{i}", ids, p, structured_param=field) for i, (ids, p) in enumerate(zip(prompts, params))
    ]
    want_logprobs = req.logprobs is not None
    # echo: each choice's text starts with its prompt as sent (token-id prompts decoded), and its logprobs with
    # the prompt's tokens (the first unscored), as OpenAI's legacy API and vLLM return them.
    echoes = [_echo_text(tok, p) if req.echo else "" for p in req.prompts()]

    def logprobs_of(final: RequestOutput, o: Any, start: int, offset: int, echo: bool) -> tuple[dict | None, int]:
        """The choice's `logprobs` from token `start` on, offsets from `offset`; and where the next piece starts."""
        if not want_logprobs or (o.logprobs is None and not echo):
            return None, offset
        entries: list[Any] = (o.logprobs or [])[start:]  # None: no token yet (max_tokens 0)
        if echo:
            assert final.prompt_logprobs is not None, "echo + logprobs asked the engine for prompt_logprobs"
            entries = [final.prompt_token_ids[0], *final.prompt_logprobs[1:], *entries]
        lp = srv.token_text.completion_logprobs(entries, offset, as_ids=req.return_tokens_as_token_ids)
        ids = [e if isinstance(e, int) else e.token_id for e in entries]
        return lp, offset + sum(len(srv.token_text(t)[0]) for t in ids)

    def prompt_logprobs_of(final: RequestOutput) -> dict[str, Any]:
        # vLLM's extension, on every choice of a prompt whose scores were computed (prompt_logprobs or echo).
        if final.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": srv.token_text.prompt_logprobs(final.prompt_logprobs)}

    if not req.stream:
        finals = await _unless_disconnected(request, _all_last(streams))
        choices = [
            {
                "index": p * req.n + o.index,
                "text": echoes[p] + o.text,
                "logprobs": logprobs_of(final, o, 0, 0, req.echo)[0],
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
                **prompt_logprobs_of(final),
            }
            for p, final in enumerate(finals)
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]
        return JSONResponse(_completion_body(rid, created, srv.model_name, choices, usage=_batch_usage(finals)))

    async def render(tagged: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        sent: dict[int, tuple[int, int, int]] = {}  # choice index -> (chars, tokens, logprob text offset)
        finals: dict[int, RequestOutput] = {}
        async for p, out in tagged:
            finals[p] = out
            for o in out.outputs:
                index = p * req.n + o.index
                echo = req.echo and index not in sent  # the prompt goes out with the choice's first chunk
                chars, tokens, offset = sent.get(index, (0, 0, 0))
                if chars < 0:
                    continue  # this choice already finished
                if echo and want_logprobs and len(out.prompt_logprobs or ()) < len(out.prompt_token_ids):
                    # With n > 1 another sample can start before the one that scores the prompt is prefilled:
                    # hold this choice back until the scores are complete (outputs are cumulative).
                    continue
                lp, offset = logprobs_of(out, o, tokens, offset, echo)
                sent[index] = (-1 if o.finished else len(o.text), len(o.token_ids), offset)
                text = (echoes[p] if echo else "") + o.text[chars:]
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
                if o.finished:
                    choice["stop_reason"] = o.stop_reason
                elif not choice["text"] and lp is None:
                    continue
                extra = {"usage": None} if req.include_usage else {}
                yield sse(_completion_body(rid, created, srv.model_name, [choice], **extra))
        if req.include_usage:
            usage_ = _batch_usage([finals[p] for p in sorted(finals)])
            yield sse(_completion_body(rid, created, srv.model_name, [], usage=usage_))
        yield sse("[DONE]")

    if len(streams) == 1:
        return await _event_stream(request, _tag(streams[0]), render)
    return await _event_stream(request, _merge(streams), render)


async def _tag(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with aclosing(stream):
        async for out in stream:
            yield 0, out


# ---- chat completions ---------------------------------------------------------------------------------------
async def _chat_completions(srv: _Server, request: Request, req: ChatCompletionRequest) -> Response:
    parse_tools = bool(req.tools) and req.tool_choice != "none"
    if parse_tools and srv.tool_cls is None:
        raise APIError(
            "tool calling needs the server to be started with --tool-call-parser (or send tool_choice='none')",
            param="tool_choice",
        )
    prompt = chat.render_prompt(srv.tokenizer, req)
    prompt_ids = srv.tokenizer.encode(prompt, add_special_tokens=False)
    # With tools, a <tool_call> before </think> ends the reasoning (the tool parser then finds it).
    reasoning = srv.reasoning_cls.from_prompt(prompt, tool_calls=parse_tools) if srv.reasoning_cls else None
    structured, field = chat.output_constraint(req, reasoning) or (None, None)
    params = srv.prepare(req, prompt_ids, "messages", structured)
    job = chat.ChatJob(
        request_id=new_id("chatcmpl"),
        created=now(),
        model=srv.model_name,
        n=req.n,
        logprobs=req.logprobs,
        include_usage=req.include_usage,
        reasoning=reasoning,
        tools=srv.tool_cls() if parse_tools and srv.tool_cls else None,
        token_text=srv.token_text,
    )
    outputs = srv.generate(job.request_id, prompt_ids, params, prompt_param="messages", structured_param=field)
    if req.stream:
        return await _event_stream(request, outputs, lambda outs: chat.chat_stream(job, outs))
    final = await _unless_disconnected(request, _last(outputs))
    body = chat.chat_response(job, final)
    if final.prompt_logprobs is not None:
        body["prompt_logprobs"] = srv.token_text.prompt_logprobs(final.prompt_logprobs)  # vLLM's extension
    return JSONResponse(body)


# ---- the Responses API (shaped in responses.py) ----------------------------------------------------------------
async def _responses(srv: _Server, request: Request, req: ResponsesRequest) -> Response:
    job, params, structured_param = responses.start(srv, req)
    outputs = srv.generate(
        job.response_id, job.prompt_ids, params, prompt_param="input", structured_param=structured_param
    )
    if req.stream:
        return await _event_stream(request, outputs, job.stream)
    final = await _unless_disconnected(request, _last(outputs))
    return JSONResponse(job.response(final))


# ---- the app ------------------------------------------------------------------------------------------------
def build_app(
    engine: Any,
    *,
    served_model_name: str,
    api_key: str | None = None,
    reasoning_parser: str | None = None,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine`; raises ValueError for an unknown parser name."""
    srv = _Server(engine, served_model_name, api_key, reasoning_parser, tool_call_parser)
    app = FastAPI(title="nextserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(srv.check_api_key)])

    async def answer(request: Request, kind: type[R], handler: Callable[[R], Awaitable[Response]]) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:
            # Gone before its body arrived: nothing was queued, nothing to abort.
            logger.debug("client disconnected while sending its request body (%s)", request.url.path)
            return Response(status_code=499)  # nobody reads it
        req = parse_request(body, kind)
        srv.check_model(req.model)
        try:
            return await handler(req)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the engine requests were aborted

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, ChatCompletionRequest, lambda req: _chat_completions(srv, request, req))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, CompletionRequest, lambda req: _completions(srv, request, req))

    @v1.post("/responses")
    async def create_response(request: Request) -> Response:
        return await answer(request, ResponsesRequest, lambda req: _responses(srv, request, req))

    @v1.get("/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return srv.responses.get(response_id).body

    def model_card() -> dict[str, Any]:
        return {
            "id": srv.model_name,
            "object": "model",
            "created": srv.created,
            "owned_by": "nextserve",
            "max_model_len": engine.max_model_len,
        }

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        srv.check_model(model_id)
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = srv.metrics.render()
        return Response(body, media_type=content_type)

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"no route {where}", 405: f"method not allowed: {where}"}.get(e.status_code, str(e.detail))
        body = error_body(message, code=_STATUS_CODES.get(e.status_code))
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # Only path or query parameters get here (bodies are parsed by protocol.parse_request): still a 400.
        first = e.errors()[0] if e.errors() else {"msg": "invalid request"}
        return JSONResponse(error_body(str(first.get("msg"))), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        logger.error("unhandled error while serving a request", exc_info=e)
        body = error_body("internal server error", type="server_error", code="internal_error")
        return JSONResponse(body, status_code=500)
