"""Split Qwen3 output text into reasoning and content (the `qwen3` reasoning parser).

Contract. The Qwen3 Thinking chat template ends the prompt with `<think>\\n`, so the model writes
`reasoning</think>content`. A template that does not open the block leaves the model to write
`<think>reasoning</think>content` itself, and an Instruct model (or `enable_thinking=False`) writes plain content.

- `prompt_opened_think=True`: text before the first `</think>` is reasoning, the rest is content. A `<think>` at the
  start of the output (after whitespace) is dropped too, in case the model opens the block again.
- `prompt_opened_think=False`: only an output that starts (after whitespace) with `<think>` has reasoning, up to the
  first `</think>`; any other output is all content, verbatim.
- No `</think>` after the reasoning started (cut off by length, or stopped): everything seen is reasoning and the
  content is None.
- Tags after the first `</think>` are ordinary content. `<think>` tags inside the reasoning (`<think><think>`, a
  model opening the block twice) are dropped: the reasoning never shows a tag.
- With `tool_calls=True` (the request has tools and a tool parser runs), a `<tool_call>` written before `</think>`
  ends the reasoning there (SGLang's rule: models sometimes call a tool without closing the block); the block and
  what follows are content, and the first `</think>` after it (the block closed late) is dropped.
- Newlines the template puts around the tags are trimmed: reasoning loses its leading and trailing newlines and
  the content after `</think>` loses its leading newlines (the template's "\\n\\n"). Spaces are kept.

`Qwen3ReasoningStream` takes detokenized text deltas and returns (reasoning_delta, content_delta) pairs;
`Qwen3ReasoningParser.parse` of a whole output is that stream fed the whole text (None where it gives ""), so the
two agree by construction. A tag split across deltas is held back only while the held text could still become it.
"""

from __future__ import annotations

from enum import Enum

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class Qwen3ReasoningParser:
    """The `qwen3` reasoning parser for one request; `prompt_opened_think` says whether the prompt ends in `<think>`,
    `tool_calls` whether a `<tool_call>` may end the reasoning."""

    def __init__(self, prompt_opened_think: bool, tool_calls: bool = False) -> None:
        self.prompt_opened_think = prompt_opened_think
        self.tool_calls = tool_calls

    @classmethod
    def from_prompt(cls, prompt: str, tool_calls: bool = False) -> Qwen3ReasoningParser:
        """Parser for a rendered chat prompt: the Thinking template's generation prompt ends in `<think>\\n`."""
        return cls(prompt_opened_think=prompt.rstrip().endswith(THINK_START), tool_calls=tool_calls)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; either is None when empty."""
        stream = self.stream()
        r1, c1 = stream.feed(text)
        r2, c2 = stream.finish()
        return (r1 + r2) or None, (c1 + c2) or None

    def stream(self) -> Qwen3ReasoningStream:
        return Qwen3ReasoningStream(self.prompt_opened_think, self.tool_calls)


class _Phase(Enum):
    START = "start"  # deciding whether the output opens with <think>
    REASONING = "reasoning"
    CONTENT = "content"


class Qwen3ReasoningStream:
    """Incremental `qwen3` parsing of one output: `feed` each text delta, then `finish` once."""

    def __init__(self, prompt_opened_think: bool, tool_calls: bool = False) -> None:
        self._prompt_opened_think = prompt_opened_think
        # Tags that end the reasoning; the first one found wins.
        self._ends = (THINK_END, TOOL_CALL_START) if tool_calls else (THINK_END,)
        self._phase = _Phase.START
        self._pending = ""  # received text the current phase has not consumed (a possible partial tag)
        self._reasoning_started = False  # leading newlines of the reasoning are dropped until it starts
        self._held_newlines = ""  # trailing newlines of the reasoning: dropped if `</think>` or the end follows
        self._trim_content = False  # content that follows `</think>` loses its leading newlines
        self._late_end = False  # the reasoning ended at a <tool_call>: drop the first `</think>` of the content
        self._finished = False

    def feed(self, delta: str) -> tuple[str, str]:
        """Consume one text delta; returns the (reasoning, content) text that is now certain."""
        if self._finished:
            raise ValueError("feed() called after finish()")
        self._pending += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """The output ended: release whatever was held back."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._phase is _Phase.START:
                head = self._pending.lstrip()
                if head.startswith(THINK_START):
                    self._pending = head[len(THINK_START) :]
                    self._phase = _Phase.REASONING
                elif not final and THINK_START.startswith(head):
                    break  # whitespace or a partial "<think>" so far: wait for more
                else:
                    self._phase = _Phase.REASONING if self._prompt_opened_think else _Phase.CONTENT
            elif self._phase is _Phase.REASONING:
                found = [(at, tag) for tag in self._ends if (at := self._pending.find(tag)) >= 0]
                if found:
                    end, tag = min(found)
                    reasoning.append(self._reasoning_text(self._pending[:end].replace(THINK_START, "")))
                    self._held_newlines = ""
                    self._phase = _Phase.CONTENT
                    if tag == THINK_END:
                        self._pending = self._pending[end + len(THINK_END) :]
                        self._trim_content = True
                    else:
                        self._pending = self._pending[end:]  # the <tool_call> is content
                        self._late_end = True
                    continue
                # A partial tag waits; a whole <think> inside the reasoning is dropped.
                keep = 0 if final else max(partial_tag_len(self._pending, t) for t in (THINK_START, *self._ends))
                done = self._pending[: len(self._pending) - keep]
                reasoning.append(self._reasoning_text(done.replace(THINK_START, "")))
                self._pending = self._pending[len(self._pending) - keep :]
                break
            else:
                text = self._pending
                if self._late_end:
                    at = text.find(THINK_END)
                    if at >= 0:
                        text = text[:at] + text[at + len(THINK_END) :]
                        self._late_end = False
                    elif not final and (keep := partial_tag_len(text, THINK_END)):
                        text, self._pending = text[:-keep], text[-keep:]
                        content.append(text)
                        break
                self._pending = ""
                if self._trim_content:
                    text = text.lstrip("\n")
                    self._trim_content = not text  # trim until the first other character
                content.append(text)
                break
        return "".join(reasoning), "".join(content)

    def _reasoning_text(self, text: str) -> str:
        """Reasoning text to emit now; trailing newlines wait to see whether more reasoning follows them."""
        if not self._reasoning_started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._reasoning_started = True
        text = self._held_newlines + text
        emitted = text.rstrip("\n")
        self._held_newlines = text[len(emitted) :]
        return emitted
