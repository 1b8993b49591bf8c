"""Tests of opsd.reward: answer extraction, math equivalence (math_verify and the fallback), reward weights."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from opsd import reward as R
from opsd.core.weighting import reward_weights

# (completion, ground truth, expected reward)
REWARD_TABLE = [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "1/2", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "1/2", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt2", 1.0),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "3\\sqrt{2}", 0.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{6 \\text{ cm}}", "5", 0.0),
    ("first \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),
    ("first \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\left(1, \\frac{1}{2}\\right)}", "(1,\\frac12)", 1.0),
    ("The answer is 42 but I never box it", "42", 0.0),
    ("", "42", 0.0),
    ("Let me think.\nAnswer: 42", "42", 1.0),
    ("Let me think.\nAnswer: $\\frac{3}{4}$.", "0.75", 1.0),
    ("Answer: 41", "42", 0.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\fbox{12}", "12", 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{204}", 204, 1.0),
    ("\\boxed{12", "12", 0.0),  # truncated box, nothing else
]


@pytest.mark.parametrize("completion,truth,expected", REWARD_TABLE)
def test_math_reward_table(completion, truth, expected):
    assert R.math_reward(completion, truth) == expected


# The fallback alone (math_verify unavailable) must handle the documented normal forms.
FALLBACK_TABLE = [
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
    ("\\boxed{2 \\sqrt{3}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5 cm}", "5", 1.0),
    ("\\boxed{6 \\text{ cm}}", "5", 0.0),
    ("\\boxed{3}\\boxed{4}", "4", 1.0),
    ("Answer: $42$.", "42", 1.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1,2}", "12", 0.0),
    ("\\boxed{x = 7}", "7", 1.0),
    ("\\boxed{\\text{(C)}}", "(C)", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\left( 1,2 \\right)}", "(1,2)", 1.0),
    ("no answer", "1", 0.0),
]


@pytest.mark.parametrize("completion,truth,expected", FALLBACK_TABLE)
def test_math_reward_fallback_only(monkeypatch, completion, truth, expected):
    monkeypatch.setattr(R, "_math_verify_equal", lambda pred, truth: None)
    assert R.math_reward(completion, truth) == expected


def test_math_verify_exception_falls_back(monkeypatch):
    import math_verify

    def boom(*args, **kwargs):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(math_verify, "parse", boom)
    assert R._math_verify_equal("1/2", "0.5") is None
    assert R.math_reward("\\boxed{1/2}", "0.5") == 1.0
    assert R.math_reward("\\boxed{1/3}", "0.5") == 0.0


def test_math_reward_off_main_thread():
    results = {}

    def work():
        results["vals"] = [R.math_reward(c, t) for c, t, _ in REWARD_TABLE]
        results["risky"] = R._math_verify_equal("2^{100000}", "2^{100000}")

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive()
    assert results["vals"] == [e for _, _, e in REWARD_TABLE]
    assert results["risky"] is None  # refused without a timeout, left to the normalizer


def test_math_reward_restores_sigalrm_handler():
    before = signal.getsignal(signal.SIGALRM)
    R.math_reward("\\boxed{\\frac{1}{2}}", "0.5")
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.alarm(0) == 0  # no pending alarm left behind


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
        ("x \\boxed{\\{1, 2\\}} y", "\\{1, 2\\}"),
        ("\\boxed{1} and \\fbox{2}", "2"),
        ("\\boxed {7}", "7"),
        ("\\boxed{5} then \\boxed{6", "5"),
        ("**Final Answer:** 17", "17"),
        ("answer: 3\nmore thoughts\nAnswer: 4\nDone.", "4"),
        ("Answer:", None),
        ("nothing here", None),
        (None, None),
        ([{"role": "assistant", "content": "\\boxed{9}"}], "9"),
    ],
)
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


def test_normalize_answer_examples():
    assert R.normalize_answer("$\\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert R.normalize_answer("\\left(1,2\\right)") == "(1,2)"
    assert R.normalize_answer("1,000,000") == "1000000"
    assert R.answers_match("1/2", "0.5") and R.answers_match("\\frac{1}{2}", "0.5")
    assert not R.answers_match("", "")


def test_reward_weights_formula_and_mean():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5])
    for beta in (0.1, 0.5, 1.0, 10.0):
        w = reward_weights(r, beta)
        expected = torch.exp(r / beta) / torch.exp(r / beta).sum() * r.numel()
        torch.testing.assert_close(w, expected)
        assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert (w > 0).all()
    # higher reward -> larger weight; small beta concentrates on the best samples
    w = reward_weights(r, 0.01)
    assert w[1] == pytest.approx(2.5, rel=1e-4) and w[0] < 1e-6
    # large beta -> nearly uniform
    assert torch.allclose(reward_weights(r, 1e6), torch.ones(5), atol=1e-5)


def test_reward_weights_edge_cases():
    r = torch.tensor([1.0, 0.0, 2.0])
    for beta in (None, 0, 0.0, -1.0):
        torch.testing.assert_close(reward_weights(r, beta), torch.ones(3))
    assert reward_weights(torch.tensor([]), 1.0).numel() == 0
    torch.testing.assert_close(reward_weights(torch.tensor([3.0]), 0.5), torch.ones(1))
    torch.testing.assert_close(reward_weights(torch.tensor([1.0, 1.0]), 0.1), torch.ones(2))
    # integer / list input and float64 are accepted; float64 stays float64
    assert reward_weights([1, 0], 1.0).dtype == torch.float32
    assert reward_weights(torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0).dtype == torch.float64
    # numerically stable for huge reward / tiny beta
    w = reward_weights(torch.tensor([1000.0, 0.0]), 1e-3)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(2.0)


def test_registry():
    assert R.get_reward_fn("math") is R.math_reward
    assert R.REWARD_FUNCTIONS["math"] is R.math_reward
    with pytest.raises(ValueError, match="available: \\[.math., .math_dapo.\\]"):
        R.get_reward_fn("code")
