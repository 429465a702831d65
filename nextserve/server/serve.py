"""`nextserve serve`: build the engine from the command line, wrap it in the OpenAI app, run uvicorn.

`add_arguments` adds the server's flags and then every engine flag (`EngineConfig.add_cli_args`); `run` loads the
engine, serves until interrupted, shuts the engine down and returns the exit code. Once the socket is bound it logs
one line, `nextserve ready: http://HOST:PORT (model NAME)`, which scripts can wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from nextserve.assets import default_model_path

logger = logging.getLogger("nextserve.server")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--model", default=default_model_path(), help="model directory (default: the built-in tiny model)"
    )
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    group.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: the model folder's name)"
    )
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    group.add_argument("--reasoning-parser", default=None, help="split reasoning from content: qwen3")
    group.add_argument("--tool-call-parser", default=None, help="parse tool calls from the output: qwen")
    group.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="log level (default: info)")
    try:
        from nextserve.config import EngineConfig
    except ImportError:  # the engine's flags are optional while the package is being assembled
        return
    EngineConfig.add_cli_args(parser, skip=("model",))


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or Path(args.model).name


def build_server(engine: Any, args: argparse.Namespace) -> Any:
    """The uvicorn server for `engine` (a `uvicorn.Server` that logs the ready line once it is listening)."""
    import uvicorn

    from nextserve.server.app import build_app

    name = served_name(args)
    app = build_app(
        engine,
        served_model_name=name,
        api_key=args.api_key,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                # With --port 0 the kernel chose the port: report the real one.
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                logger.info("nextserve ready: http://%s:%d (model %s)", args.host, port, name)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return _Server(config)


def run(args: argparse.Namespace) -> int:
    from nextserve.engine.async_engine import AsyncEngine
    from nextserve.server.parsers import get_reasoning_parser, get_tool_call_parser

    # Check the cheap things before loading a model: unknown parser names raise ValueError here.
    if args.reasoning_parser:
        get_reasoning_parser(args.reasoning_parser)
    if args.tool_call_parser:
        get_tool_call_parser(args.tool_call_parser)
    engine = AsyncEngine.from_cli_args(args)
    server = build_server(engine, args)

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            await engine.shutdown()

    asyncio.run(serve())
    return 0 if server.started else 1
