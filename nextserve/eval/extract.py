"""Answer extraction for the GSM8K and MMLU evaluations.

Contract:
- `normalize_number(text)` turns a number as people write it ("$1,234.00", "-3", "2.50", "1,234.") into
  one canonical string ("1234", "-3", "2.5") so two spellings of the same value compare equal; None if `text`
  holds no number.
- `extract_gsm8k_answer(text)` finds the final numeric answer of a model's reply, trying in order the GSM8K
  marker `#### n`, `\\boxed{n}`, "the answer is n", then the last number in the text. Returns the normalised
  number or None (counted as an invalid answer).
- `gsm8k_gold(answer)` reads the reference answer after `####` of a GSM8K record.
- `extract_mmlu_letter(text)` finds the chosen option among A-D ("Answer: C", "The answer is (C)", "(C)",
  "C.", a bare "C", lower case too) and returns the upper-case letter or None.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number with an optional sign and dollar sign, thousands separated by commas or not, and an optional
# decimal part. Grouped thousands are matched first so "1,234" stays one number while "3, 4" stays two.
_NUMBER = r"-?\$?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)

# "#### 42": the GSM8K reference format, which few-shot prompts teach the model to imitate.
_HASH_RE = re.compile(r"####\s*(" + _NUMBER + ")")
# \boxed{...} without nested braces; the number is searched inside (it may carry units or "\$").
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
# "The answer is 42", "Final answer: $1,234.00", "**Answer:** -3".
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)?[\s:*=]*(" + _NUMBER + ")", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical form of the first number in `text` ("$1,234.00" -> "1234", "2.50" -> "2.5"), or None."""
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    # "$-3" and "-$3" both leave one minus; a doubled sign would only come from odd text like "--3".
    negative = raw.count("-") % 2 == 1
    try:
        value = Decimal(raw.replace("-", ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits digits, commas and one dot
        return None
    if negative:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    # normalize() drops trailing zeros; format "f" avoids the exponent form Decimal uses for small values.
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The normalised final number of a GSM8K reply, or None when the reply holds no number."""
    # The first "####" wins: a model that keeps going after its answer starts imitating the next example.
    hashed = _HASH_RE.search(text)
    if hashed is not None:
        return normalize_number(hashed.group(1))
    for boxed in reversed(_BOXED_RE.findall(text)):
        number = normalize_number(boxed)
        if number is not None:
            return number
    # The last "the answer is" wins: chain-of-thought replies restate their conclusion at the end.
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return normalize_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K `answer` field ("...\\n#### 72" -> "72")."""
    marker = answer.rfind("####")
    if marker < 0:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    number = normalize_number(answer[marker + 4 :])
    if number is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer[-80:]!r}")
    return number


# "Answer: C", "The answer is (C)", "correct option is c", "Answer: **C**". `after` is the character right
# after the letter (or its closing bracket), used to tell an answer from the start of a word.
_MMLU_STATED_RE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:)?[\s:*]*[(\[]?([A-Da-d])(?P<close>[)\]])?(?P<after>.?)",
    re.IGNORECASE | re.DOTALL,
)
_MMLU_BOXED_RE = re.compile(r"\\boxed\s*\{\s*(?:\\text\{)?\s*\(?([A-Da-d])\)?\s*\}?\s*\}")
# A reply that starts with its letter, as completions after "Answer:" do: " C", "C.", "(C)", "C) 42", "c\n".
# The letter must be closed by punctuation, a line end or the end of the text: "A person..." is not read as A.
_MMLU_LEADING_RE = re.compile(r"\s*[*(\[]*([A-Da-d])(?:[)\].:*]|[ \t]*\n|\s*$)")
_MMLU_PAREN_RE = re.compile(r"\(([A-Da-d])\)")


def _stands_alone(letter: str, closed: bool, after: str) -> bool:
    """Whether a letter after "answer is" is an answer rather than a word ("answer is Australia", "is a bit").

    An upper-case letter counts unless a letter or digit follows directly. A lower-case one is the everyday
    word "a" too often, so it counts only when a bracket closed it, punctuation follows, or the text ends.
    """
    if after.isalnum() or after == "_":
        return False
    if letter.isupper() or closed:
        return True
    return after == "" or after in ".,;:!?*\n"


def extract_mmlu_letter(text: str) -> str | None:
    """The option letter (A-D) chosen in an MMLU reply, or None when none is found."""
    # The last stated answer wins, as for GSM8K: reasoning may weigh several options before concluding.
    for match in reversed(list(_MMLU_STATED_RE.finditer(text))):
        if _stands_alone(match.group(1), match.group("close") is not None, match.group("after")):
            return match.group(1).upper()
    boxed = _MMLU_BOXED_RE.findall(text)
    if boxed:
        return boxed[-1].upper()
    leading = _MMLU_LEADING_RE.match(text)
    if leading is not None:
        return leading.group(1).upper()
    parens = _MMLU_PAREN_RE.findall(text)
    return parens[-1].upper() if parens else None
