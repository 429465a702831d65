"""A synthetic word-level tokenizer over any vocabulary size, for dummy weights in a folder without a tokenizer.

`synthetic_tokenizer(vocab_size, eos_token_id=None)` builds a transformers fast tokenizer in memory (the
`tokenizers` library's WordLevel model): one token per whitespace-separated word, so a text of N vocabulary words
encodes to exactly N ids (nothing added, no BOS), decoding joins words with single spaces, and
decode(encode(text)) == text for any text of vocabulary words separated by single spaces. A word outside the
vocabulary encodes to `<unk>`.

Id layout:
  eos_token_id (default vocab_size - 1)   <|im_end|>: the ChatML turn end is the EOS, so a chat reply ends there
  the next highest free ids                <|im_start|>, <|endoftext|> (padding), <unk>
  every other id, from 0 up                words: the ChatML roles, the common English words that `bench serve`'s
                                           random dataset draws from (so its prompts are N distinct tokens, not N
                                           `<unk>`s that a prefix cache would match), then short letter strings
                                           "a".."z", "aa".."zz", ... skipping words already taken

Every id decodes to a distinct string; with `skip_special_tokens=True` the four special tokens decode to nothing.
The chat template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`); its newlines are whitespace to this
tokenizer, so rendering a conversation and decoding it back gives the words separated by single spaces.
"""

from __future__ import annotations

from itertools import count, islice, product
from string import ascii_lowercase

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nextserve.bench.words import WORDS

IM_START, IM_END, ENDOFTEXT, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"

ROLES = ("system", "user", "assistant", "tool")

ENGLISH = WORDS  # bench serve's prompt words, so that its prompts of N words are N tokens

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPECIALS_BELOW_EOS = (IM_START, ENDOFTEXT, UNK)


def synthetic_tokenizer(vocab_size: int, eos_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` ids (layout in the module docstring)."""
    if vocab_size < 8:
        raise ValueError(f"a synthetic tokenizer needs a vocabulary of at least 8 ids, got {vocab_size}")
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    if not 0 <= eos < vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab_size} ids")
    special_ids = {eos: IM_END}
    free_top = (i for i in range(vocab_size - 1, -1, -1) if i != eos)
    for token, i in zip(_SPECIALS_BELOW_EOS, free_top):
        special_ids[i] = token
    word_ids = [i for i in range(vocab_size) if i not in special_ids]
    vocab = {token: i for i, token in special_ids.items()}
    vocab.update(zip(_words(len(word_ids)), word_ids))

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder puts one space before every token that is not a "##" continuation; no word here starts
    # with "##", so the words come out joined by single spaces (and a window of ids decodes with its leading gap
    # when it follows context, which keeps incremental detokenisation spaced).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    # Registered as special: matched before the whitespace split, so "<|im_start|>user" is two tokens.
    tok.add_special_tokens([IM_END, *_SPECIALS_BELOW_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def _words(n: int) -> list[str]:
    """n distinct words without whitespace: the roles, the English words, then "a".."z", "aa", ... not yet used."""
    words = list(dict.fromkeys((*ROLES, *ENGLISH)))[:n]
    taken = set(words)
    words += islice((w for w in _letter_strings() if w not in taken), n - len(words))
    return words


def _letter_strings():
    for length in count(1):
        for letters in product(ascii_lowercase, repeat=length):
            yield "".join(letters)
