"""Output parsers of the OpenAI server: reasoning (`--reasoning-parser`) and tool calls (`--tool-call-parser`).

Both work on detokenized text, never token ids. Per request the server makes a parser object, calls `parse` on a
whole output or `stream()` for a stateful feed/finish object on text deltas. Reasoning is parsed first; the tool
parser sees only the content stream. Pure Python: no torch, no web framework.
"""

from nextserve.server.parsers.reasoning import Qwen3ReasoningParser, Qwen3ReasoningStream
from nextserve.server.parsers.tool_calls import (
    ContentDelta,
    QwenToolCallParser,
    QwenToolCallStream,
    StreamEvent,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    finish_reason,
)

# vLLM's and SGLang's Qwen3-Next Thinking commands name deepseek_r1 (reasoning from the start of the output, up to
# </think>): the qwen3 parser does that whenever the prompt opened <think>, which the Thinking template does.
_REASONING_PARSERS: dict[str, type[Qwen3ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek_r1": Qwen3ReasoningParser,
    "deepseek-r1": Qwen3ReasoningParser,
}
# Qwen2.5 and Qwen3 write Hermes-style <tool_call> blocks, hence the aliases.
_TOOL_CALL_PARSERS: dict[str, type[QwenToolCallParser]] = {
    "qwen": QwenToolCallParser,
    "qwen25": QwenToolCallParser,
    "hermes": QwenToolCallParser,
}


def get_reasoning_parser(name: str) -> type[Qwen3ReasoningParser]:
    """The reasoning parser class registered as `name`; construct it per request."""
    if name not in _REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(_REASONING_PARSERS))}")
    return _REASONING_PARSERS[name]


def get_tool_call_parser(name: str) -> type[QwenToolCallParser]:
    """The tool-call parser class registered as `name`; construct it per request."""
    if name not in _TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(_TOOL_CALL_PARSERS))}")
    return _TOOL_CALL_PARSERS[name]


__all__ = [
    "ContentDelta",
    "Qwen3ReasoningParser",
    "Qwen3ReasoningStream",
    "QwenToolCallParser",
    "QwenToolCallStream",
    "StreamEvent",
    "ToolCall",
    "ToolCallArgsDelta",
    "ToolCallStart",
    "finish_reason",
    "get_reasoning_parser",
    "get_tool_call_parser",
]
