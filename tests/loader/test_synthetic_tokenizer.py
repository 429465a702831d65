"""The synthetic word-level tokenizer of dummy loading: one id per word, exact round trips, a ChatML template, and
incremental detokenisation that keeps the spaces between words."""

from __future__ import annotations

import random
import time

import pytest

from nextserve.bench.serve import WORDS, random_requests
from nextserve.engine.detokenizer import IncrementalDetokenizer
from nextserve.loader.synthetic_tokenizer import IM_END, IM_START, UNK, synthetic_tokenizer


@pytest.fixture(scope="module")
def small():
    return synthetic_tokenizer(512, eos_token_id=1)


def test_qwen_sized_vocabulary_decodes_every_id_to_a_distinct_word_fast():
    start = time.perf_counter()
    tok = synthetic_tokenizer(151936, eos_token_id=151645)
    ids = list(range(151936))
    words = tok.decode(ids).split(" ")
    assert len(tok) == 151936 and len(words) == 151936 and len(set(words)) == 151936
    assert tok.encode(" ".join(words), add_special_tokens=False) == ids
    assert max(len(w) for w in words) <= 14  # short: a 1024-word prompt stays a few KB
    assert tok.eos_token_id == 151645 and tok.convert_ids_to_tokens(151645) == IM_END
    assert time.perf_counter() - start < 5


def test_small_vocabulary_layout(small):
    ids = list(range(512))
    words = [small.decode([i]) for i in ids]
    assert len(set(words)) == 512 and all(w and " " not in w for w in words)
    assert small.eos_token_id == 1 and small.convert_ids_to_tokens(1) == IM_END
    specials = {small.convert_ids_to_tokens(i) for i in (511, 510, 509)}
    assert specials == {IM_START, UNK, "<|endoftext|>"}
    assert (
        small.decode([0, 1, 2, 509, 510, 511], skip_special_tokens=True) == f"{small.decode([0])} {small.decode([2])}"
    )
    with pytest.raises(ValueError):
        synthetic_tokenizer(512, eos_token_id=512)


def test_n_words_encode_to_n_ids_and_round_trip(small):
    rng = random.Random(0)
    words = [small.decode([i]) for i in range(512) if i not in small.all_special_ids]
    for n in (1, 7, 1024):
        text = " ".join(rng.choices(words, k=n))
        ids = small.encode(text, add_special_tokens=False)
        assert len(ids) == n
        assert small.decode(ids) == text
        assert small(text)["input_ids"] == ids  # no BOS either way
    assert small.encode("zzzzzzzz", add_special_tokens=False) == [small.unk_token_id]


def test_bench_serve_random_prompts_are_n_distinct_tokens(small):
    tok = synthetic_tokenizer(151936)
    assert UNK not in tok.convert_ids_to_tokens(tok.encode(" ".join(WORDS), add_special_tokens=False))
    for req in random_requests(4, 1024, 8, 0.0, seed=0):
        ids = tok.encode(req.prompt, add_special_tokens=False)
        assert len(ids) == req.prompt_len == 1024 and tok.unk_token_id not in ids
        assert tok.decode(ids) == req.prompt


def test_chat_template_renders_and_encodes(small):
    msgs = [{"role": "system", "content": "time year"}, {"role": "user", "content": "people way day"}]
    text = small.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\ntime year<|im_end|>\n<|im_start|>user\npeople way day<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = small.encode(text, add_special_tokens=False)
    tokens = small.convert_ids_to_tokens(ids)
    turns = [IM_START, "system", "time", "year", IM_END, IM_START, "user", "people", "way", "day", IM_END]
    assert tokens == turns + [IM_START, "assistant"]
    assert small.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == ids
    assert small.decode(ids, skip_special_tokens=True) == "system time year user people way day assistant"


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenisation_keeps_word_spaces(small, skip):
    rng = random.Random(1)
    prompt = [rng.randrange(512) for _ in range(6)]
    output = [rng.randrange(512) for _ in range(40)] + [small.eos_token_id]
    detok = IncrementalDetokenizer(small, prompt, skip_special_tokens=skip)
    for i in range(0, len(output), 3):  # several tokens per step, as speculative decoding delivers them
        detok.step(output[i : i + 3])
    detok.step([], finished=True)
    prompt_text = small.decode(prompt, skip_special_tokens=skip)
    # The text continues the prompt: prompt text + output text is the whole sequence, one space between words.
    assert prompt_text + detok.text == small.decode(prompt + output, skip_special_tokens=skip)
    assert detok.text.strip() == small.decode(output, skip_special_tokens=skip)
