"""The OpenAI-compatible HTTP server (`nextserve serve`); the only package that imports fastapi and uvicorn.

`app.build_app(engine, ...)` is the app over an `AsyncEngine`; `protocol` is the wire format, `chat` the chat
endpoint's shaping, `metrics` the Prometheus metrics, `serve` the command, `parsers` the reasoning and tool-call
parsers (pure Python). Nothing is imported here, so `nextserve.server.parsers` stays free of the web framework.
"""
