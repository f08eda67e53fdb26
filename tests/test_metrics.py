"""Metric functions against hand-checked cases from the reference definitions (STACK.md, VQA/ChartQA)."""
import pytest

from evals.metrics import (
    extract_short_answer,
    normalize_vqa_answer,
    question_prior,
    relaxed_accuracy,
    relaxed_correctness,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                 # number words -> digits
    ("ten", "10"),
    ("none", "0"),
    ("The red one", "red 1"),     # articles dropped, number word mapped
    ("a dog", "dog"),
    ("Yes.", "yes"),              # period outside a number is stripped
    ("3.5", "3.5"),               # ... but not inside one
    ("dont", "don't"),            # contractions fixed
    ("isnt", "isn't"),
    ("red, white", "red white"),  # ", " -> removed
    ("black-and-white", "black and white"),  # '-' not next to a space -> space
    ("1,000", "1000"),            # comma between digits -> removed
    ("  blue\n", "blue"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    # 10 annotators, prediction matches 2 of them: each of the 10 subsets of 9 -> min(1, m/3)
    # subsets dropping a matching answer see 1 match (1/3), the 8 others see 2 matches (2/3)
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 matches: 3 subsets see 2 (2/3), 7 see 3 (1.0)
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("Yes.", answers) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("no", ["no"] * 10) == 1.0
    assert vqa_accuracy("maybe", ["no"] * 10) == 0.0


def test_vqa_single_answer_is_normalised_exact_match():
    assert vqa_accuracy("The circle", ["circle"]) == 1.0
    assert vqa_accuracy("circles", ["circle"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("pred, target, ok", [
    ("100", "104", True),          # |100-104|/104 = 3.8% <= 5%
    ("100", "106", False),         # 5.66% > 5%
    ("95", "100", True),           # exactly 5%
    ("94.9", "100", False),
    ("57%", "0.57", True),         # trailing % divides by 100
    ("0.57", "57%", True),
    ("Yes", "yes", True),          # non-numeric: case-insensitive exact match
    ("Green line", "green line", True),
    ("green", "Green line", False),
    ("0", "0", True),              # target 0: exact match
    ("0.01", "0", False),
    (" 7 ", "7", True),
])
def test_chartqa_relaxed(pred, target, ok):
    assert relaxed_correctness(pred, target) is ok


def test_relaxed_accuracy_any_label():
    assert relaxed_accuracy("12", ["3", "12.3"]) == 1.0
    assert relaxed_accuracy("5", ["3", "12.3"]) == 0.0


@pytest.mark.parametrize("text, short", [
    ("red", "red"),
    (" 7\n", "7"),
    ("The answer is blue.", "blue"),
    ("Let me look. Final Answer: 12.5", "12.5"),
    ("<think>three bars</think><answer>3</answer>", "3"),
    ("yes.", "yes"),
])
def test_extract_short_answer(text, short):
    assert extract_short_answer(text) == short


def test_question_prior_most_frequent():
    prior = question_prior(["q1", "q1", "q1", "q2"], ["a", "b", "b", "c"])
    assert prior == {"q1": "b", "q2": "c"}
