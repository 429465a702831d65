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
- Tags after the first `</think>` are ordinary content.
- Newlines the template puts around the tags are trimmed: reasoning loses its leading and trailing newlines and
  the content after `</think>` loses its leading newlines (the template's "\\n\\n"). Spaces are kept.

`Qwen3ReasoningParser.parse` handles a whole output; `Qwen3ReasoningStream` takes detokenized text deltas and
returns (reasoning_delta, content_delta) pairs whose concatenations equal `parse` of the whole text ("" where
`parse` says None). A tag split across deltas is held back only while the held text could still become the tag.
"""

from __future__ import annotations

from enum import Enum

THINK_START = "<think>"
THINK_END = "</think>"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class Qwen3ReasoningParser:
    """The `qwen3` reasoning parser for one request; `prompt_opened_think` says whether the prompt ends in `<think>`."""

    def __init__(self, prompt_opened_think: bool) -> None:
        self.prompt_opened_think = prompt_opened_think

    @classmethod
    def from_prompt(cls, prompt: str) -> Qwen3ReasoningParser:
        """Parser for a rendered chat prompt: the Thinking template's generation prompt ends in `<think>\\n`."""
        return cls(prompt_opened_think=prompt.rstrip().endswith(THINK_START))

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; either is None when empty."""
        head = text.lstrip()
        if head.startswith(THINK_START):
            body = head[len(THINK_START) :]
        elif self.prompt_opened_think:
            body = text
        else:
            return None, text or None
        reasoning, closed, content = body.partition(THINK_END)
        reasoning = reasoning.strip("\n") or None
        if not closed:
            return reasoning, None
        return reasoning, content.lstrip("\n") or None

    def stream(self) -> Qwen3ReasoningStream:
        return Qwen3ReasoningStream(self.prompt_opened_think)


class _Phase(Enum):
    START = "start"  # deciding whether the output opens with <think>
    REASONING = "reasoning"
    CONTENT = "content"


class Qwen3ReasoningStream:
    """Incremental `qwen3` parsing of one output: `feed` each text delta, then `finish` once."""

    def __init__(self, prompt_opened_think: bool) -> None:
        self._prompt_opened_think = prompt_opened_think
        self._phase = _Phase.START
        self._pending = ""  # received text the current phase has not consumed (a possible partial tag)
        self._reasoning_started = False  # leading newlines of the reasoning are dropped until it starts
        self._held_newlines = ""  # trailing newlines of the reasoning: dropped if `</think>` or the end follows
        self._trim_content = False  # content that follows `</think>` loses its leading newlines
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
                end = self._pending.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._reasoning_text(self._pending[:end]))
                    self._held_newlines = ""
                    self._pending = self._pending[end + len(THINK_END) :]
                    self._phase = _Phase.CONTENT
                    self._trim_content = True
                    continue
                keep = 0 if final else partial_tag_len(self._pending, THINK_END)
                reasoning.append(self._reasoning_text(self._pending[: len(self._pending) - keep]))
                self._pending = self._pending[len(self._pending) - keep :]
                break
            else:
                text, self._pending = self._pending, ""
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
