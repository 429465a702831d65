"""`nextserve serve`: build the engine from the command line, wrap it in the OpenAI app, run uvicorn.

`add_arguments` adds the server's flags and then every engine flag (`EngineConfig.add_cli_args`); `run` loads the
engine, serves until interrupted, shuts the engine down and returns the exit code. Once the socket is bound it logs
one line, `nextserve ready: http://HOST:PORT (model NAME)`, which scripts can wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any

from nextserve.assets import default_model_path
from nextserve.hub import is_hub_id

logger = logging.getLogger("nextserve.server")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Qwen3-Next writes <think> blocks (Thinking) and <tool_call> blocks (both): the parsers are on unless turned off.
DEFAULT_REASONING_PARSER = "qwen3"
DEFAULT_TOOL_CALL_PARSER = "qwen"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    # `nextserve serve MODEL`, as `vllm serve MODEL`; --model / --model-path (SGLang) say the same.
    group.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="model folder or hub id")
    group.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help="model folder, or a Hugging Face hub id resolved through the hub cache (default: the built-in tiny model)",
    )
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    group.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: the model folder's name)"
    )
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    group.add_argument(
        "--reasoning-parser",
        default=DEFAULT_REASONING_PARSER,
        help=f"split reasoning from content: qwen3 (alias deepseek_r1), or none (default: {DEFAULT_REASONING_PARSER})",
    )
    group.add_argument(
        "--tool-call-parser",
        default=DEFAULT_TOOL_CALL_PARSER,
        help="parse tool calls from the output: qwen (aliases qwen25, hermes), or none "
        f"(default: {DEFAULT_TOOL_CALL_PARSER})",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="(vLLM) accepted: tool calls are parsed whenever a request has tools and a --tool-call-parser is on",
    )
    group.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="log level (default: info)")
    try:
        from nextserve.config import EngineConfig
    except ImportError:  # the engine's flags are optional while the package is being assembled
        return
    EngineConfig.add_cli_args(parser, skip=("model",))


def resolve_model_arg(args: argparse.Namespace) -> None:
    """Sets args.model from the positional MODEL or --model (they must agree), else the built-in model."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag or args.model or default_model_path()


def served_name(args: argparse.Namespace) -> str:
    # A hub id is served under its own name, as vLLM and SGLang do; a folder under its last component.
    if args.served_model_name:
        return args.served_model_name
    return args.model if is_hub_id(args.model) else Path(args.model).name


def parser_name(name: str | None) -> str | None:
    """A --reasoning-parser / --tool-call-parser value, with "none" (or empty) meaning off."""
    return None if name is None or name.strip().lower() in ("", "none") else name


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (not yet listen) before the model loads, so a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is already in use (another server?); pick another with --port, or --port 0 "
                "for any free one"
            ) from None
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


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
    from nextserve.config import EngineConfig
    from nextserve.engine.async_engine import AsyncEngine
    from nextserve.engine.tp import make_engine, run_node
    from nextserve.server.parsers import get_reasoning_parser, get_tool_call_parser

    resolve_model_arg(args)
    args.reasoning_parser = parser_name(args.reasoning_parser)
    args.tool_call_parser = parser_name(args.tool_call_parser)
    # Check the cheap things before loading a model: unknown parser names raise ValueError here, the config (flags,
    # hub id) is validated, and the port is bound.
    if args.reasoning_parser:
        get_reasoning_parser(args.reasoning_parser)
    if args.tool_call_parser:
        get_tool_call_parser(args.tool_call_parser)
    config = EngineConfig.from_cli_args(args)
    if config.node_rank > 0:
        logger.info("nextserve: node %d of %d, following node 0 at %s", config.node_rank, config.nnodes,
                    config.dist_init_addr)  # fmt: skip
        run_node(config)
        return 0
    sock = bind_socket(args.host, args.port)
    logger.info("nextserve: bound %s:%d; loading %s", args.host, sock.getsockname()[1], config.model or args.model)
    try:
        engine = AsyncEngine(make_engine(config))
    except BaseException:
        sock.close()
        raise
    server = build_server(engine, args)

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            await engine.shutdown()
            sock.close()

    asyncio.run(serve())
    return 0 if server.started else 1
