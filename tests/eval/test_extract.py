"""Answer extraction on the shapes models actually write, and on text that holds no answer."""

import pytest

from nextserve.eval.extract import extract_gsm8k_answer, extract_mmlu_letter, gsm8k_gold, normalize_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", "42"),
        ("1,234", "1234"),
        ("1,234.00", "1234"),
        ("$1,234.00", "1234"),
        ("$ 5", "5"),
        ("-3", "-3"),
        ("$-3", "-3"),
        ("-$3", "-3"),
        ("2.5", "2.5"),
        ("2.50", "2.5"),
        ("0.00100", "0.001"),
        ("10.0", "10"),
        ("-0", "0"),
        ("1,234,567", "1234567"),
        ("about 7 apples", "7"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("####-3", "-3"),
        # The first #### wins: what follows it is the model imitating another example.
        ("So 5.\n#### 5\n\nQuestion: how many? 3 + 3 = 6\n#### 6", "5"),
        ("The answer is 42.", "42"),
        ("The answer is: $1,234.00.", "1234"),
        ("**Final Answer:** -3", "-3"),
        ("First the answer is 3, but wait, the answer is 4", "4"),
        ("Thus \\boxed{42}", "42"),
        ("\\boxed{\\$1,234}", "1234"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("Try \\boxed{x} then \\boxed{2.50}", "2.5"),
        ("It costs 12 dollars per hour, so 12 * 3 = 36 dollars", "36"),
        ("He paid $1,234.50 in total", "1234.5"),
        ("The temperature drops to -3 degrees", "-3"),
        ("Then 3, 4, 5 follow", "5"),
        ("I cannot solve this.", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_spellings_compare_equal():
    assert extract_gsm8k_answer("The answer is $1,234.00") == gsm8k_gold("... so\n#### 1234")
    assert extract_gsm8k_answer("#### 2.50") == gsm8k_gold("#### 2.5")
    assert extract_gsm8k_answer("#### 7") != gsm8k_gold("#### 70")


def test_gsm8k_gold():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_gold("#### 1,000") == "1000"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_gold("72")
    with pytest.raises(ValueError, match="no number"):
        gsm8k_gold("#### none")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: C", "C"),
        ("answer: d", "D"),
        ("The answer is (C)", "C"),
        ("The answer is (b).", "B"),
        ("The correct answer is B because the others are wrong.", "B"),
        ("Answer: **A**", "A"),
        ("I would pick option D.", "D"),
        ("Maybe the answer is A... no, the answer is C.", "C"),
        ("(C)", "C"),
        ("(c) is right", "C"),
        ("C.", "C"),
        ("C. 42 kg", "C"),
        ("C) Paris", "C"),
        (" C", "C"),
        ("C", "C"),
        ("c", "C"),
        (" B\n\nThe following are", "B"),
        ("Reasoning here. \\boxed{D}", "D"),
        ("\\boxed{\\text{B}}", "B"),
        ("The choices (A) and (B) are close; the best is (D)", "D"),
        # Prose that only looks like a letter is not an answer.
        ("A person would say yes", None),
        ("The answer is a bit unclear", None),
        ("The answer is Australia", None),
        ("a dog", None),
        ("E", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_mmlu_letter(text, expected):
    assert extract_mmlu_letter(text) == expected
