"""Incremental detokenizer: equality with a full decode, split multi-byte characters, stop strings."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from nextserve.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, café au lait, résumé, naïve, déjà vu.",
    "日本語のテキストです。日本語を話します。",
    "emoji 😀 🎉 👍🏽 and more emoji 😀😀",
    "The quick brown fox jumps over the lazy dog. STOP here.",
]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


def _byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte's printable stand-in character (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_CHARS = _byte_chars()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", additional_special_tokens=["<|endoftext|>"]
    )
    wrapped.add_tokens(["<think>"])  # added but not special: kept by skip_special_tokens
    return wrapped


def byte_tokens(tokenizer, data: bytes, merge: bool = True) -> list[int]:
    """Tokens for raw bytes, so that token boundaries can fall anywhere: BPE-merged where the vocabulary
    allows (a token may end inside one character and start another), else one token per byte."""
    chars = [BYTE_CHARS[b] for b in data]
    if not merge:
        return tokenizer.convert_tokens_to_ids(chars)
    return [t.id for t in tokenizer.backend_tokenizer.model.tokenize("".join(chars))]


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    """Feed ids in chunks (sizes cycled), then finish; return every delta, checking each is final text."""
    deltas, i, sizes = [], 0, chunks or [1]
    while i < len(ids) and not detok.finished:
        size = sizes[len(deltas) % len(sizes)]
        delta, _ = detok.step(ids[i : i + size])
        deltas.append(delta)
        i += size
    if not detok.finished:
        deltas.append(detok.step([], finished=True)[0])
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_match_a_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 25))]
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        deltas = stream(detok, output, chunks=[rng.randint(1, 3) for _ in range(4)])
        expected = tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
        assert detok.text == expected, (prompt, output)
        # Append-only: every intermediate text is a prefix of the final one, so no U+FFFD was taken back.
        for n in range(len(deltas)):
            assert expected.startswith("".join(deltas[:n]))


def test_multibyte_characters_split_over_byte_tokens_are_never_broken(tokenizer):
    text = "日本語 😀 café 👍🏽!"
    ids = byte_tokens(tokenizer, text.encode(), merge=False)
    assert len(ids) > len(text)  # characters really are split over several tokens
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = stream(detok, ids)
    assert detok.text == text and "\ufffd" not in "".join(deltas)
    assert "" in deltas  # some steps had to wait for the rest of a character


def test_real_replacement_characters_are_emitted(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    data = [b"\xe6\x97", b"a", b"\x80", b"b", b"\xe6"]
    assert detok.step(byte_tokens(tokenizer, data[0])) == ("", None)  # could still become a character
    assert detok.step(byte_tokens(tokenizer, data[1])) == ("\ufffda", None)  # it did not: a real U+FFFD
    assert detok.step(byte_tokens(tokenizer, data[2])) == ("", None)
    assert detok.step(byte_tokens(tokenizer, data[3])) == ("\ufffdb", None)
    assert detok.step(byte_tokens(tokenizer, data[4]), finished=True) == ("\ufffd", None)  # cut off at the end
    assert detok.text == tokenizer.decode(byte_tokens(tokenizer, b"".join(data)))


def test_prompt_context_does_not_leak_into_the_output(tokenizer):
    prompt = tokenizer.encode("Hello world<|im_end|>日本")
    output = tokenizer.encode("語のテキスト")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    stream(detok, output)
    assert detok.text == "語のテキスト"
    # A prompt that ends inside a character does not complete it with the output's first bytes.
    cut = IncrementalDetokenizer(tokenizer, byte_tokens(tokenizer, "日".encode()[:1]))
    stream(cut, byte_tokens(tokenizer, "日".encode()[1:]))
    assert cut.text == tokenizer.decode(byte_tokens(tokenizer, "日".encode()[1:]))


class CountingTokenizer:
    """Records the length of every id list decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_bounded_window(tokenizer):
    counting = CountingTokenizer(tokenizer)
    output = tokenizer.encode(" ".join(CORPUS) * 5)
    detok = IncrementalDetokenizer(counting, tokenizer.encode("prompt text"))
    stream(detok, output)
    assert detok.text == tokenizer.decode(output, skip_special_tokens=True)
    assert len(output) > 200 and max(counting.lengths) <= 8


TEXT = "Hello 日本語 world 😀 STOP here 語"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["STOP", "語 wo", "😀 S", "o 日", "H"])
def test_stop_string_split_at_every_position(tokenizer, stop, include):
    data = TEXT.encode()
    start = TEXT.index(stop)
    expected = TEXT[: start + len(stop)] if include else TEXT[:start]
    first = len(TEXT[:start].encode())
    for split in range(first, first + len(stop.encode()) + 1):
        ids = byte_tokens(tokenizer, data[:split]) + byte_tokens(tokenizer, data[split:])
        # The stop completes with the token holding its last byte; find that token.
        needed = next(n for n in range(len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
        for chunks in ([1], [2, 1, 3]):
            detok = IncrementalDetokenizer(tokenizer, [], stop=["zzz", stop], include_stop_str_in_output=include)
            consumed, hit = 0, None
            while hit is None:
                size = chunks[consumed % len(chunks)]
                hit = detok.step(ids[consumed : consumed + size])[1]
                consumed = min(consumed + size, len(ids))
                # Nothing returned may belong to the stop string (unless asked for) or follow it.
                assert expected.startswith(detok.text), (split, detok.text)
            assert (hit, detok.text, detok.finished) == (stop, expected, True), split
            assert consumed - max(chunks) < needed <= consumed
            with pytest.raises(RuntimeError):
                detok.step(ids[consumed:])


@pytest.mark.parametrize("include", [False, True])
def test_random_sequences_with_stop_strings(tokenizer, include):
    rng = random.Random(1)
    vocab = len(tokenizer)
    for _ in range(300):
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))]
        full = tokenizer.decode(output, skip_special_tokens=True)
        stops = ["@@"]  # never in the text
        for _ in range(rng.randint(1, 3)):
            if len(full) > 1:
                start = rng.randrange(len(full) - 1)
                stops.append(full[start : start + rng.randint(1, 4)])
        # The reference: the stop string whose first occurrence ends first (then starts first) cuts the text.
        matches = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        end, start, stop = min(matches) if matches else (len(full), len(full), None)
        detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include)
        stream(detok, output, chunks=[rng.randint(1, 3) for _ in range(4)])
        assert (detok.text, detok.stop_reason) == (full[: end if include else start], stop), (output, stops)


def test_partial_stop_string_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    assert detok.step(tokenizer.encode("abc ST")) == ("abc ", None)
    assert detok.step(tokenizer.encode("O")) == ("", None)
    assert detok.step(tokenizer.encode("RM")) == ("STORM", None)
    assert detok.step(tokenizer.encode(" S")) == (" ", None)
    assert detok.step([], finished=True) == ("S", None)
    assert detok.text == "abc STORM S" and detok.finished


def test_first_stop_string_to_complete_wins(tokenizer):
    for include, expected in [(False, "xa"), (True, "xabc")]:
        detok = IncrementalDetokenizer(tokenizer, [], stop=["abcd", "bc"], include_stop_str_in_output=include)
        assert detok.step(tokenizer.encode("xabcde")) == (expected, "bc")


def test_stop_string_made_of_special_token_text(tokenizer):
    ids = tokenizer.encode("answer<|im_end|>more")
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, stop=["<|im_end|>"])
    assert kept.step(ids) == ("answer", "<|im_end|>")
    skipped = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["<|im_end|>"])
    assert skipped.step(ids) == ("answermore", None)


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, [], stop=[""])
