"""Extract Qwen/Hermes-style tool calls from content text (the `qwen` tool-call parser, alias `qwen25`, `hermes`).

Contract. The model writes zero or more blocks `<tool_call>\\n{"name": "fn", "arguments": {...}}\\n</tool_call>`,
usually after some plain content and separated by "\\n". A block is a tool call when its text is one JSON object
(surrounded by JSON whitespace) with a non-empty string "name" and "arguments" that is an object, a JSON string of
one, or missing (taken as {}); other keys are ignored, duplicate keys anywhere make the block malformed.
`ToolCall.arguments` is `json.dumps(arguments, ensure_ascii=False)`, so equal JSON gives equal strings.

A block ends at `</tool_call>` after its JSON, and also, when the model forgot the end tag, at the end of the output
(a stop string such as "</tool_call>" removes it, max_tokens can cut it) or at the next `<tool_call>`: a complete
JSON object followed only by whitespace (and a partial end tag) is still a call.

Content: the text outside blocks. Whitespace right before a block is dropped; a segment after a block is dropped
when it is only whitespace and kept verbatim otherwise. Output with no block is content verbatim. A malformed block
(invalid JSON, not a valid call, text after its JSON) is content, verbatim, from its `<tool_call>` through the first
`</tool_call>` after it (or the end of the output); the blocks around it are still parsed, so one bad block does not
lose the good ones.

`QwenToolCallStream` takes content deltas and returns events: `ContentDelta`, then per call index a
`ToolCallStart` (id and name, sent once `"arguments": {` is seen) followed by `ToolCallArgsDelta`s. Argument text is
re-serialised as it arrives (`_JsonNormalizer`), so the deltas of a call concatenate to exactly the `arguments` that
`parse` returns. Blocks in another shape (keys in another order, arguments as a string) are held until they close
and then sent whole. `QwenToolCallParser.parse` is the stream fed the whole output, so the two always agree on
content and calls. A block found malformed after its start (and argument deltas) went out cannot take them back; its
index is then skipped, and only `QwenToolCallStream.tool_calls` (completed calls) should decide the finish reason.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nextserve.server.parsers.reasoning import partial_tag_len

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_JSON_WS = " \t\n\r"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    arguments: str


StreamEvent = ContentDelta | ToolCallStart | ToolCallArgsDelta


def new_tool_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def finish_reason(tool_calls: Sequence[ToolCall], reason: str | None) -> str | None:
    """OpenAI finish reason: "tool_calls" once a finished output produced a call, else the engine's reason."""
    if reason is None or reason == "abort":
        return reason
    return "tool_calls" if tool_calls else reason


class _MalformedBlock(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys but the streamed text would hold both: refuse them.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _MalformedBlock("duplicate key in a tool call")
    return obj


# strict=False admits raw control characters inside strings, which models write in code arguments.
_DECODER = json.JSONDecoder(strict=False, object_pairs_hook=_unique_keys)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _close_block(text: str, start: int, at_end: bool = False) -> tuple[Any, int] | None:
    """Decode the block body at text[start:]: (JSON value, index where the block ends) once it is closed.

    Closed by `</tool_call>` (the end is after it), by a following `<tool_call>` (the end is before it), or, with
    `at_end` (the output is over), by the end of the text after a partial end tag at most. None while it may still
    close; raises _MalformedBlock when it can no longer close.
    """
    try:
        value, end = _DECODER.raw_decode(text, _skip_ws(text, start))
    except ValueError:
        if at_end:
            raise _MalformedBlock("the output ended inside a tool call") from None
        return None
    end = _skip_ws(text, end)
    rest = text[end:]
    if rest.startswith(TOOL_CALL_END):
        return value, end + len(TOOL_CALL_END)
    if rest.startswith(TOOL_CALL_START):
        return value, end
    if TOOL_CALL_END.startswith(rest) or TOOL_CALL_START.startswith(rest):
        return (value, len(text)) if at_end else None  # "" or a partial tag
    raise _MalformedBlock("text after the JSON of a tool call")


def _call_fields(value: Any) -> tuple[str, str]:
    """(name, arguments JSON) of a decoded block, or _MalformedBlock."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise _MalformedBlock("a tool call needs a non-empty string name")
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _DECODER.decode(arguments)  # ValueError on bad JSON, same as _MalformedBlock for callers
    if not isinstance(arguments, dict):
        raise _MalformedBlock("tool call arguments must be a JSON object")
    return value["name"], json.dumps(arguments, ensure_ascii=False)


class QwenToolCallParser:
    """The `qwen` tool-call parser (stateless; `stream()` gives the per-request streaming state)."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole output; content is None when empty."""
        stream = self.stream()
        events = stream.feed(text) + stream.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        return content or None, stream.tool_calls

    def stream(self) -> QwenToolCallStream:
        return QwenToolCallStream()


_HEX = frozenset(string.hexdigits)
_BARE = frozenset(string.ascii_letters + string.digits + "+-.")  # characters of numbers and literals
_LITERALS = frozenset({"true", "false", "null", "NaN", "Infinity", "-Infinity"})  # what json.loads accepts
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
# How json.dumps(ensure_ascii=False) writes each character it escapes (taken from json itself to agree with it).
_ESCAPED = {c: json.dumps(c)[1:-1] for c in [*map(chr, range(32)), '"', "\\"]}


class _JsonNormalizer:
    """Reads one JSON object char by char and writes it as json.dumps(ensure_ascii=False) would, as early as possible.

    Whitespace is dropped, separators become ", " and ": ", strings are decoded and re-escaped one character at a
    time, numbers and literals wait for their end and go through json.loads/json.dumps. Raises ValueError on text
    that json.loads (strict=False, no duplicate keys) would refuse.
    """

    def __init__(self) -> None:
        self._stack: list[set[str] | None] = []  # open containers: the keys seen for an object, None for an array
        self._expect = "value"  # value | value_or_end | key | key_or_end | colon | comma_or_end
        self._in_string = False
        self._key: list[str] | None = None  # decoded characters when the string being read is a key
        self._escape: str | None = None  # text after a backslash until the escape is complete
        self._high: int | None = None  # a \uD800-\uDBFF escape waiting for its low surrogate
        self._token = ""  # number or literal being read
        self.done = False

    def feed(self, text: str) -> tuple[str, int]:
        """Normalised text for `text`, and how many of its characters belong to the object."""
        out: list[str] = []
        for i, ch in enumerate(text):
            if self._in_string:
                self._string_char(ch, out)
            else:
                self._structural_char(ch, out)
            if self.done:
                return "".join(out), i + 1
        return "".join(out), len(text)

    def _structural_char(self, ch: str, out: list[str]) -> None:
        if self._token:
            if ch in _BARE:
                self._token += ch
                return
            if self._token not in _LITERALS and not _NUMBER.fullmatch(self._token):
                raise ValueError(f"invalid JSON token {self._token!r}")
            out.append(json.dumps(json.loads(self._token)))
            self._token = ""
            self._expect = "comma_or_end"
        if ch in _JSON_WS:
            return
        expect = self._expect
        in_object = bool(self._stack) and self._stack[-1] is not None
        closer = "}" if in_object else "]"
        if expect in ("value", "value_or_end") and ch in '{["' or expect in ("key", "key_or_end") and ch == '"':
            out.append(ch)
            if ch == '"':
                self._in_string = True
                self._key = [] if expect.startswith("key") else None
            else:
                self._stack.append(set() if ch == "{" else None)
                self._expect = "key_or_end" if ch == "{" else "value_or_end"
        elif expect in ("value", "value_or_end") and ch in _BARE:
            self._token = ch
        elif ch == closer and self._stack and expect in ("comma_or_end", "key_or_end" if in_object else "value_or_end"):
            out.append(ch)
            self._stack.pop()
            self._expect = "comma_or_end"
            self.done = not self._stack
        elif ch == "," and expect == "comma_or_end" and self._stack:
            out.append(", ")
            self._expect = "key" if in_object else "value"
        elif ch == ":" and expect == "colon":
            out.append(": ")
            self._expect = "value"
        else:
            raise ValueError(f"unexpected {ch!r} in JSON (expected {expect})")

    def _string_char(self, ch: str, out: list[str]) -> None:
        if self._escape is None:
            if ch == "\\":
                self._escape = ""
                return
            self._flush_high(out)
            if ch == '"':
                self._end_string(out)
            else:
                self._char(ch, out)
            return
        self._escape += ch
        if self._escape[0] != "u":
            if self._escape not in _SHORT_ESCAPES:
                raise ValueError(f"invalid JSON escape \\{self._escape}")
            self._flush_high(out)
            self._char(_SHORT_ESCAPES[self._escape], out)
            self._escape = None
        elif len(self._escape) > 1 and ch not in _HEX:
            raise ValueError(f"invalid JSON escape \\{self._escape}")
        elif len(self._escape) == 5:
            code = int(self._escape[1:], 16)
            self._escape = None
            # json pairs \uD8xx\uDCxx into one character; any other high surrogate stays alone.
            if self._high is not None and 0xDC00 <= code <= 0xDFFF:
                self._char(chr(0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)), out)
                self._high = None
                return
            self._flush_high(out)
            if 0xD800 <= code <= 0xDBFF:
                self._high = code
            else:
                self._char(chr(code), out)

    def _flush_high(self, out: list[str]) -> None:
        if self._high is not None:
            self._char(chr(self._high), out)
            self._high = None

    def _char(self, ch: str, out: list[str]) -> None:
        out.append(_ESCAPED.get(ch, ch))
        if self._key is not None:
            self._key.append(ch)

    def _end_string(self, out: list[str]) -> None:
        out.append('"')
        self._in_string = False
        if self._key is None:
            self._expect = "comma_or_end"
            return
        key, self._key = "".join(self._key), None
        keys = self._stack[-1]
        assert keys is not None, "keys are only read inside objects"
        if key in keys:
            raise ValueError(f"duplicate JSON key {key!r}")
        keys.add(key)
        self._expect = "colon"


# `{"name": "<fn>", "arguments": ` followed by `{`: the shape whose arguments can be streamed as they come.
_W = "[ \\t\\n\\r]*"
_HEADER = re.compile(rf'{_W}\{{{_W}"name"{_W}:{_W}("(?:[^"\\]|\\.)*"){_W},{_W}"arguments"{_W}:{_W}(?=\{{)', re.DOTALL)


class _Phase(Enum):
    CONTENT = "content"  # outside blocks
    HEADER = "header"  # inside a block, before the arguments object (or holding a block of another shape)
    ARGS = "args"  # streaming the arguments object
    TAIL = "tail"  # after the arguments object, waiting for `</tool_call>`
    MALFORMED = "malformed"  # inside a malformed block: content until the first `</tool_call>`


class QwenToolCallStream:
    """Incremental `qwen` parsing of one output's content: `feed` each delta, then `finish` once."""

    def __init__(self) -> None:
        self._phase = _Phase.CONTENT
        self._pending = ""  # received text the current phase has not consumed
        self._events: list[StreamEvent] = []
        self._finished = False
        # Content whitespace rules (module docstring): trailing whitespace waits to see what follows it.
        self._held_ws = ""
        self._after_block = False
        self._segment_has_text = False
        # The block being read.
        self._block = ""  # raw text after `<tool_call>`
        self._block_ws = ""  # whitespace before `<tool_call>`: content again if the block is malformed
        self._args: _JsonNormalizer | None = None
        self._check: _JsonNormalizer | None = None  # validates a block of another shape as it arrives
        self._sent_args: list[str] = []
        self._call_id = ""
        self._call_name = ""
        self._tool_calls: list[ToolCall] = []
        self._started = 0  # calls whose ToolCallStart was sent; the next call's index

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Calls completed so far (closed and valid), with the ids that were streamed."""
        return list(self._tool_calls)

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise ValueError("feed() called after finish()")
        self._pending += delta
        return self._advance(final=False)

    def finish(self) -> list[StreamEvent]:
        """The output ended: flush held text; an unclosed block is released as content."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[StreamEvent]:
        while True:
            if self._phase is _Phase.CONTENT:
                step = self._content_step
            elif self._phase is _Phase.MALFORMED:
                step = self._malformed_step
            else:
                step = self._block_step
            if not step(final):
                break
        events, self._events = self._events, []
        return events

    def _content_step(self, final: bool) -> bool:
        start = self._pending.find(TOOL_CALL_START)
        if start < 0:
            keep = 0 if final else partial_tag_len(self._pending, TOOL_CALL_START)
            self._content(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            if final and self._held_ws and (self._segment_has_text or not self._after_block):
                self._emit_content(self._held_ws)
            return False
        self._content(self._pending[:start])
        self._block_ws, self._held_ws = self._held_ws, ""
        self._pending = self._pending[start + len(TOOL_CALL_START) :]
        self._block, self._args, self._check, self._sent_args = "", None, _JsonNormalizer(), []
        self._phase = _Phase.HEADER
        return True

    def _block_step(self, final: bool) -> bool:
        new, self._pending = self._pending, ""
        self._block += new
        try:
            if self._phase is _Phase.HEADER and (header := _HEADER.match(self._block)):
                name = json.loads(header[1], strict=False)
                if not name:
                    raise _MalformedBlock("empty tool name")
                self._start_call(name)
                self._args = _JsonNormalizer()
                self._phase = _Phase.ARGS
                self._feed_args(self._block[header.end() :])
            elif self._phase is _Phase.ARGS:
                self._feed_args(new)
            elif self._phase is _Phase.HEADER and self._check is not None and not self._check.done:
                self._check.feed(new)  # ValueError as soon as the JSON cannot become valid
            if self._phase in (_Phase.HEADER, _Phase.TAIL):
                closed = _close_block(self._block, 0, at_end=final)
                if closed is not None:
                    self._end_call(*closed)
                    return True
        except ValueError:
            self._start_malformed()
            return True
        if final:
            self._start_malformed()
            return True
        return False

    def _start_malformed(self) -> None:
        """The block is content, through the first `</tool_call>` after its `<tool_call>`."""
        self._emit_content(self._block_ws + TOOL_CALL_START)
        self._pending = self._block + self._pending
        self._block = self._block_ws = ""
        self._segment_has_text = True
        self._phase = _Phase.MALFORMED

    def _malformed_step(self, final: bool) -> bool:
        end = self._pending.find(TOOL_CALL_END)
        if end < 0:
            keep = 0 if final else partial_tag_len(self._pending, TOOL_CALL_END)
            self._emit_content(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            return False
        end += len(TOOL_CALL_END)
        self._emit_content(self._pending[:end])
        self._pending = self._pending[end:]
        self._after_block, self._held_ws = False, ""
        self._phase = _Phase.CONTENT
        return True

    def _feed_args(self, text: str) -> None:
        assert self._args is not None
        normalized, _ = self._args.feed(text)
        if normalized:
            self._sent_args.append(normalized)
            self._emit(ToolCallArgsDelta(self._started - 1, normalized))
        if self._args.done:
            self._phase = _Phase.TAIL

    def _start_call(self, name: str) -> None:
        self._call_id, self._call_name = new_tool_call_id(), name
        self._emit(ToolCallStart(self._started, self._call_id, name))
        self._started += 1

    def _end_call(self, value: Any, end: int) -> None:
        name, arguments = _call_fields(value)
        if self._phase is _Phase.HEADER:  # a block of another shape: send it whole
            self._start_call(name)
            self._emit(ToolCallArgsDelta(self._started - 1, arguments))
        elif (name, arguments) != (self._call_name, "".join(self._sent_args)):
            raise _MalformedBlock("streamed call disagrees with the decoded block")
        self._tool_calls.append(ToolCall(self._call_id, name, arguments))
        self._pending = self._block[end:]
        self._after_block, self._segment_has_text = True, False
        self._phase = _Phase.CONTENT

    def _content(self, text: str) -> None:
        """Content outside blocks, holding back trailing whitespace (dropped if a block follows)."""
        text = self._held_ws + text
        body = text.rstrip()
        if body:
            self._emit_content(body)
            self._segment_has_text = True
        self._held_ws = text[len(body) :]

    def _emit_content(self, text: str) -> None:
        if text:
            self._emit(ContentDelta(text))

    def _emit(self, event: StreamEvent) -> None:
        # Merge with the previous event of the same kind so one feed gives one event per kind and call.
        last = self._events[-1] if self._events else None
        if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
            self._events[-1] = ContentDelta(last.text + event.text)
        elif isinstance(event, ToolCallArgsDelta) and isinstance(last, ToolCallArgsDelta) and last.index == event.index:
            self._events[-1] = ToolCallArgsDelta(event.index, last.arguments + event.arguments)
        else:
            self._events.append(event)
