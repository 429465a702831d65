"""Guided decoding: grammars compiled with xgrammar, one matcher per sequence, token masks for the sampler.

Contract.
- `GrammarCache(tokenizer, vocab_size, stop_ids)` compiles a `StructuredOutput` (JSON schema, JSON object, regex,
  choice, EBNF, structural tag) against the tokenizer on a small thread pool, never on the engine loop, and caches
  the result by `StructuredOutput.key()` (kind, spec text, start_after). `submit` returns a Future (identical specs
  in flight share one compilation); `get` waits for it. A spec xgrammar cannot compile raises `GrammarError` (a
  ValueError) naming the problem; failures are not cached. xgrammar is imported, and the tokenizer's vocabulary
  read (`TokenizerInfo`, vocabulary size = the model's padded one, stop ids = the engine's EOS ids), on first use.
- `GrammarState` is one sequence's matcher. `accept(token)` advances it by a committed token (the engine's process
  half, for every appended token); `fill(bitmask, row, pending)` writes the tokens allowed after the committed
  tokens plus `pending` (drafts not verified yet) into one row of the batch's bitmask, then rolls the matcher back
  over `pending`, so rejected drafts never reach the committed state. With `start_after` (e.g. `</think>`) the
  output is free until that token, and the grammar (after up to two newlines) applies to what follows it.
- `apply_token_bitmask(logits, bitmask)` sets the logits of disallowed tokens to -inf in place, for the whole
  batch at once, without reading anything back to the host: xgrammar's C++ kernel on CPU (it skips all-ones words),
  a table unpack and one masked_fill on other devices (no Triton import).

JSON is generated compact (json.dumps' ", " and ": " separators, no other whitespace), also inside structural tags
(tool-call arguments): with free whitespace a weak model can loop on newlines and never close the value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from nextserve.sampling_params import StructuredOutput

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

# Compiled grammars kept (least recently used dropped first). Each holds token masks per grammar state, up to a few MB
# over a 152k vocabulary, so the bound also bounds host memory.
MAX_CACHED_GRAMMARS = 128

# What may come between a `start_after` token and the constrained output: up to two newlines.
_AFTER_START = 'root ::= "" | "\\n" | "\\n\\n"'

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled (the server answers 400)."""


class GrammarCache:
    """Compiles structured-output specs off the engine loop and caches them; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], workers: int = 2) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()  # the cache
        self._compiler_lock = threading.Lock()  # building the compiler (seconds for a large vocabulary)
        self._cache: OrderedDict[tuple[str, str, str | None], Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nextserve-grammar")

    def submit(self, spec: StructuredOutput) -> Future:
        """A Future of the compiled grammar; compiles at most once per key while cached."""
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._cache[key] = self._pool.submit(self._compile, spec)
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f: self._forget_failed(key, f))
        return fut

    def get(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """The compiled grammar (waits for the compilation); GrammarError if it cannot be compiled."""
        return self.submit(spec).result()

    def start_token(self, spec: StructuredOutput) -> int | None:
        """The token id of `spec.start_after` (None without one); GrammarError unless it is exactly one token."""
        if spec.start_after is None:
            return None
        ids = self._tokenizer.encode(spec.start_after, add_special_tokens=False)
        if len(ids) != 1:
            raise GrammarError(
                f"structured output: start_after {spec.start_after!r} must be one token of this model's tokenizer "
                f"(it is {len(ids)})"
            )
        return ids[0]

    def new_state(self, spec: StructuredOutput, compiled: xgrammar.CompiledGrammar | None = None) -> GrammarState:
        """A fresh matcher for one sequence, of `compiled` (`spec`'s compiled grammar) or else of `get(spec)`."""
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(compiled or self.get(spec)), self.start_token(spec))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the pool's side -----------------------------------------------------------------------------------
    def _forget_failed(self, key: tuple[str, str, str | None], fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            return
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]

    def _xgr_compiler(self) -> xgrammar.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
                threads = max(1, min(8, (os.cpu_count() or 2) // 2))
                # Our own cache (keyed by spec, holding futures) is the only one.
                self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            return self._compiler

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        import xgrammar as xgr

        compiler = self._xgr_compiler()
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else spec.json
                schema = json.loads(schema) if isinstance(schema, str) else schema
                text = json.dumps(_bounded_strings_as_patterns(schema))
                grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                grammar = xgr.Grammar.from_regex(spec.regex)
            elif kind == "choice":
                # EBNF string literals take JSON's escapes.
                grammar = xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in spec.choice))
            elif kind == "grammar":
                grammar = xgr.Grammar.from_ebnf(spec.grammar)
            else:
                tag = json.loads(spec.structural_tag) if isinstance(spec.structural_tag, str) else spec.structural_tag
                grammar = xgr.Grammar.from_structural_tag(json.dumps(_compact_json_in_tag(tag)))
            if spec.start_after is not None:
                # After `</think>` a model writes "\n\n" before its answer (the chat template's own layout); allow
                # it rather than force the answer's first character right after the tag.
                grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf(_AFTER_START), grammar)
            return compiler.compile_grammar(grammar)
        except Exception as e:  # xgrammar raises RuntimeError from C++, its own errors, pydantic's, TypeError
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "choice": "choice list"}.get(
                kind, kind
            )
            detail = _CPP_PREFIX.sub("", str(e).strip()).splitlines()
            raise GrammarError(
                f"structured output: cannot compile the {what}: {detail[0] if detail else type(e).__name__}"
            ) from None


def _bounded_strings_as_patterns(node: Any) -> Any:
    """A copy of the schema where each plain string with minLength/maxLength becomes the same bound as a pattern.

    NOTE: xgrammar 0.2.9 compiles such a string to a rule that admits raw control characters (invalid JSON: the
    noisy test model writes them) and no escapes; a pattern is matched on the JSON string's value, which has
    neither. Strings with a pattern, format, enum or const are left to xgrammar."""
    if isinstance(node, list):
        return [_bounded_strings_as_patterns(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings_as_patterns(v) for k, v in node.items()}
    bounds = ("minLength" in out or "maxLength" in out) and not {"pattern", "format", "enum", "const"} & out.keys()
    if out.get("type") == "string" and bounds:
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^[^\\x00-\\x1f]{{{lo},{hi}}}$"
    return out


def _compact_json_in_tag(node: Any) -> Any:
    """A copy of a structural tag whose JSON-schema contents (plain JSON style) are compact JSON grammars: xgrammar
    lets a tag's JSON take any whitespace, and a weak model then loops on newlines (tool-call arguments)."""
    import xgrammar as xgr

    if isinstance(node, list):
        return [_compact_json_in_tag(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json" and "json_schema" in node:
        schema = json.dumps(_bounded_strings_as_patterns(node["json_schema"]))
        return {"type": "grammar", "grammar": str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))}
    return {k: _compact_json_in_tag(v) for k, v in node.items()}


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class GrammarState:
    """One sequence's grammar matcher, advanced by committed tokens only (engine thread)."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, start_token: int | None) -> None:
        self.matcher = matcher
        self.start_token = start_token
        self.started = start_token is None  # False while the output is still free (before `start_after`)

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return self.started and self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Commit one generated token; False if the grammar does not allow it (the matcher is then unchanged)."""
        if not self.started:
            self.started = token == self.start_token
            return True
        return self.matcher.accept_token(token)

    def fill(self, bitmask: torch.Tensor, row: int, pending: Sequence[int] = ()) -> None:
        """Allowed next tokens after the committed tokens + `pending`, into bitmask[row] (left all ones while the
        output is free, or when a pending token is refused: such a row is never used, verification stops at the
        refused draft)."""
        started, accepted = self.started, 0
        for tok in pending:
            if started and self.matcher.is_terminated():
                break  # drafts past the end of the grammar: never verified (the sequence stops first)
            if not started:
                started = tok == self.start_token
            elif self.matcher.accept_token(tok):
                accepted += 1
            else:
                started = False  # leave the row all ones
                break
        if started and not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(bitmask, row)
        if accepted:
            self.matcher.rollback(accepted)

    def filler(self, pending: Sequence[int] = ()) -> Callable[[torch.Tensor, int], None]:
        """`fill` bound to `pending`, as the sampler's SamplingRow.token_mask."""
        pending = tuple(pending)
        return lambda bitmask, row: self.fill(bitmask, row, pending)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [B, V] f32 (contiguous), bitmask [B, ceil(V / 32)] int32 on the same device: -inf where a bit is 0."""
    vocab = logits.shape[-1]
    if logits.device.type == "cpu":
        from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

        apply_token_bitmask_inplace_cpu(logits, bitmask, vocab)
        return
    logits.masked_fill_(~unpack_bitmask(bitmask, vocab), float("-inf"))


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V / 32)] int32 -> [B, V] bool (True: allowed) on the bitmask's device. Each int32 word is read as its
    4 little-endian bytes and a 256 x 8 table gives a byte's bits (bit i of word w is token 32 w + i, xgrammar's
    layout)."""
    table = _BYTE_BITS.get(bitmask.device)
    if table is None:
        byte = torch.arange(256, device=bitmask.device)
        table = _BYTE_BITS[bitmask.device] = (byte[:, None] >> torch.arange(8, device=bitmask.device)) & 1 == 1
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # [B, 4 W]
    return table[as_bytes].view(bitmask.shape[0], -1)[:, :vocab_size]  # [B, 32 W] -> [B, V]
