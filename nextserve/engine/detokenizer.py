"""Incremental detokenization of one sequence, with stop strings.

Contract: `IncrementalDetokenizer.step(new_token_ids, finished=False)` returns `(delta, stop)`: text to append to
what was returned before (never taken back) and the stop string that ended the sequence, if any. `text` is the
concatenation of all deltas. Once the sequence is finished (a stop string hit, or `finished=True` from the
caller, e.g. `step([], finished=True)` after EOS or max_tokens) `text` equals
`tokenizer.decode(output_ids, skip_special_tokens=...)` cut before the first stop string (after it with
include_stop_str_in_output), for byte-level BPE tokenizers such as Qwen's.

Decoding uses two token offsets into the sequence (the prefix/read-offset technique): tokens[prefix:read] were
decoded last step and serve as context, tokens[read:] are new. Each step decodes that bounded window twice and
emits the difference, so cost does not grow with the output length. While the window's text ends in U+FFFD a
multi-byte character may still be incomplete: that trailing U+FFFD run is held and the window waits for the next
step; a U+FFFD that really is in the output is emitted once other text follows it, or when the sequence ends.

Stop strings are searched in the decoded text, so one split over several tokens is found. A tail that could still
become a stop string (the longest suffix that is a proper prefix of one) is held back until it either completes
the stop string or stops matching.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the first output tokens, so that tokenizers whose decoding depends on the
# preceding token (a leading space, say) render the first output token as a continuation.
_CONTEXT_TOKENS = 4
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output

        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # NOTE: a prompt ending inside a character would make the output's first bytes complete it; decoding
        # the output on its own keeps the text equal to decode(output_ids).
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        # Only the decoding window is kept, tokens[prefix:]: it is trimmed as the prefix offset advances.
        self._window: list[int] = context
        self._read_offset = len(context)  # relative to the window's start
        self._window_returned = 0  # chars past the context's text already returned while the window waits

        self._text = ""  # returned so far
        self._unsent = ""  # decoded but held back: it could be the start of a stop string
        self.finished = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far: every delta returned, concatenated."""
        return self._text

    def step(
        self, new_token_ids: Sequence[int], finished: bool = False, check_stop: bool = True
    ) -> tuple[str, str | None]:
        """Add newly generated tokens; return (text delta, stop string hit or None).

        `finished=True` marks the last call: everything held back is released. After a stop string is hit the
        sequence is finished and further calls raise RuntimeError. `check_stop=False` (while fewer than
        min_tokens exist, as vLLM does) neither looks for stop strings nor holds text back for them.
        """
        if self.finished:
            raise RuntimeError("the sequence is finished; no more tokens can be added")
        self._window.extend(new_token_ids)
        new_text = self._decode_window(flush=finished)

        hit = self._find_stop(new_text) if self._stop and new_text and check_stop else None
        if hit is not None:
            self.finished, self.stop_reason = True, hit[1]
            delta = hit[0]
        else:
            pending = self._unsent + new_text
            hold = 0 if finished or self._include_stop or not check_stop else self._partial_stop_len(pending)
            delta, self._unsent = pending[: len(pending) - hold], pending[len(pending) - hold :]
            self.finished = finished
        self._text += delta
        return delta, self.stop_reason

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, flush: bool) -> str:
        """Text of the tokens past the read offset not returned yet, short of a possibly incomplete character."""
        prefix_text = self._decode(self._window[: self._read_offset])
        full_text = self._decode(self._window)
        # NOTE: only a trailing run of U+FFFD can change when more bytes arrive (one per incomplete byte
        # sequence with byte-level BPE, one per byte with byte fallback); everything before it is final.
        certain = full_text if flush else full_text.rstrip(_REPLACEMENT_CHAR)
        start = len(prefix_text) + self._window_returned
        new_text = certain[start:]
        # Equal lengths: the new tokens decode to nothing (skipped special tokens); keep the old context.
        if len(certain) == len(full_text) and len(full_text) > len(prefix_text):
            # The window slides: this step's new tokens become the next step's context.
            del self._window[: self._read_offset]
            self._read_offset, self._window_returned = len(self._window), 0
        else:
            self._window_returned += len(new_text)
        return new_text

    def _find_stop(self, new_text: str) -> tuple[str, str] | None:
        """(delta up to the cut, stop string) for the stop string that completes first in new_text, if any."""
        # Matches may start in text already returned (include_stop_str_in_output) or held back.
        look_back = self._text[len(self._text) - min(len(self._text), self._max_stop_len - 1) :]
        region = look_back + self._unsent + new_text
        old_len = len(region) - len(new_text)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop:
            start = region.find(s, max(0, old_len - len(s) + 1))
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return None
        end, start, s = best
        cut = end if self._include_stop else start
        # Held-back text guarantees that nothing returned belongs to the stop string.
        assert cut >= len(look_back), "a stop string started inside text already returned"
        return region[len(look_back) : cut], s

    def _partial_stop_len(self, pending: str) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best
