"""Rule-based rewards for math prompts (the per-sample reward weighting itself is opsd.core.weighting).

Public API
----------
- ``extract_answer(text) -> str | None``: the model's final answer (last ``\\boxed{}``/``\\fbox{}``, else the last
  DAPO-style ``Answer: ...`` line).
- ``math_reward(completion, ground_truth) -> float``: 1.0 if the extracted answer matches the ground truth, else 0.0.
- ``math_dapo_reward(completion, ground_truth) -> float``: upstream's strict rule (last ``Answer:`` line, Minerva
  normalization, exact match); registered as ``math_dapo``.
- ``REWARD_FUNCTIONS`` / ``get_reward_fn(name)``: name -> reward function registry (upstream's ``math_reward`` is
  accepted as an alias of ``math``).

Equivalence checking
--------------------
``math_reward`` first asks math_verify (``parse`` + ``verify``), which understands LaTeX, fractions, sets,
intervals, units and equations. When math_verify is unavailable, raises, times out, or says "not equal", a small
conservative normalizer decides instead (see ``normalize_answer`` and ``answers_match``); a match by either one
gives reward 1.0. The normalizer only ever accepts answers that are the same string or the same number after
normalization, so it cannot accept anything that math_verify would reasonably reject.

Timeouts and threads
--------------------
math_verify implements its timeouts with ``signal.alarm``, which only works on the main thread (elsewhere it
raises ``ValueError``). On the main thread we pass ``parsing_timeout``/``timeout_seconds`` =
``MATH_VERIFY_TIMEOUT_S``. Off the main thread (reward workers, data-loader threads) we pass ``None`` (no signal
handling) and instead refuse to hand math_verify inputs that are known to make sympy slow: answers longer than
``MAX_VERIFY_CHARS`` characters, or containing huge exponents/factorials. Those go to the normalizer only, so the
reward never hangs.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from fractions import Fraction
from typing import Callable


logger = logging.getLogger(__name__)

#: Seconds math_verify may spend on parsing / on one comparison (main thread only; see module docstring).
MATH_VERIFY_TIMEOUT_S = 5
#: Longer answers skip math_verify when no timeout can be enforced (off the main thread).
MAX_VERIFY_CHARS = 300

__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "MAX_VERIFY_CHARS",
    "REWARD_FUNCTIONS",
    "answers_match",
    "extract_answer",
    "get_reward_fn",
    "math_dapo_reward",
    "math_reward",
    "normalize_answer",
    "normalize_dapo_answer",
]


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Answer: ...", "Final Answer: ...", "**Answer:** ..." (case-insensitive); the rest of that line is the answer.
_ANSWER_LINE_RE = re.compile(r"(?i)(?<![a-z])answer\s*\**\s*:\s*\**\s*(.*)")


def _balanced_group(text: str, open_idx: int) -> str | None:
    """Content of the brace group whose ``{`` is at ``open_idx``; None when it never closes. ``\\{``/``\\}`` are
    escaped braces and do not count."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\ ...)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def _strip_outer(ans: str) -> str:
    ans = ans.strip()
    # surrounding math delimiters: $...$, $$...$$, \(...\), \[...\]
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : len(ans) - len(right)].strip()
            break
    return ans


def extract_answer(text) -> str | None:
    """The final answer written in ``text``.

    1. The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance; nested braces are kept
       (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). A truncated last box falls back to the previous one.
    2. Otherwise the last ``Answer: ...`` line (DAPO's format; also ``Final Answer:`` and ``**Answer:**``), with
       surrounding ``$`` and a trailing period removed.
    3. Otherwise None.

    ``text`` may also be a conversational completion (list of ``{"role", "content"}`` messages): the last
    message's content is used.
    """
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        if not text:
            return None
        last = text[-1]
        text = last.get("content", "") if isinstance(last, dict) else str(last)
    if not isinstance(text, str):
        text = str(text)

    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _balanced_group(text, match.end() - 1)
        if content is not None:
            content = content.strip()
            return content if content else None

    matches = _ANSWER_LINE_RE.findall(text)
    for raw in reversed(matches):
        ans = raw.strip().rstrip("*").strip()
        ans = _strip_outer(ans)
        ans = ans.rstrip(".").strip()
        ans = _strip_outer(ans)
        if ans:
            return ans
    return None


# ----------------------------------------------------------------------------------------------------------------
# Fallback normalizer
# ----------------------------------------------------------------------------------------------------------------

_NUMBER_BEFORE_TEXT_RE = re.compile(r"^(.*?\d)\s*(?:\\text|\\mathrm|\\mbox)\s*\{[^{}]*\}\s*$")
_UNIT_WORD_RE = re.compile(
    r"(?<=\d)\s*(?:cm|mm|km|m|kg|g|s|sec|seconds?|minutes?|hours?|days?|units?|degrees?|inches|inch|feet|ft|"
    r"meters?|dollars?|cents?|mph|sq\s*units?)\s*$"
)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(ans) -> str:
    """Conservative string normal form of an answer (the fallback when math_verify cannot decide).

    Removes: all ``$`` (and ``\\$``), surrounding ``\\(\\)``/``\\[\\]``, ``\\left``/``\\right``, ``\\!``/``\\,``/``\\;``/``~`` spacing,
    all whitespace, a trailing period, ``^\\circ``/``^{\\circ}``/``\\%``/``%``, a unit after a number
    (``5 \\text{ cm}``, ``5 cm``), a leading ``x =`` style variable assignment. Unwraps ``\\text{...}``
    (``\\text{(C)}`` -> ``(C)``), maps ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, and
    thousands separators ``1,000`` -> ``1000`` (only in the exact ``d,ddd`` pattern, so tuples survive).
    """
    if ans is None:
        return ""
    s = str(ans).strip()
    s = _strip_outer(s)
    s = s.replace("\\$", "").replace("$", "")  # dollar signs (math delimiters or currency)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[!,;:> ]", " ", s).replace("~", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\%", "").replace("%", "")
    # unit after a number: "5 \text{ cm}" -> "5", "12 cm" -> "12"
    m = _NUMBER_BEFORE_TEXT_RE.match(s)
    if m:
        s = m.group(1)
    s = _UNIT_WORD_RE.sub("", s)
    s = _TEXT_WRAP_RE.sub(lambda mm: mm.group(1), s)
    # leading single-variable assignment "x = 5" -> "5"
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    return s


_INT_OR_DEC_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_SLASH_RE = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")


def _as_number(s: str) -> Fraction | None:
    """Exact value of a normalized integer / decimal / ``a/b`` / ``\\frac{a}{b}`` string, else None."""
    if not s or len(s) > 64:
        return None
    try:
        if _INT_OR_DEC_RE.match(s):
            return Fraction(s)
        m = _SLASH_RE.match(s)
        if m:
            den = int(m.group(2))
            return Fraction(int(m.group(1)), den) if den != 0 else None
        m = _FRAC_RE.match(s)
        if m:
            den = int(m.group(3))
            if den == 0:
                return None
            value = Fraction(int(m.group(2)), den)
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def answers_match(pred, truth) -> bool:
    """Fallback equivalence: equal normal forms, or equal numbers (``1/2`` == ``\\frac{1}{2}`` == ``0.5``;
    decimals compare with a relative tolerance of 1e-6)."""
    a, b = normalize_answer(pred), normalize_answer(truth)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    return math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# math_verify wrapper
# ----------------------------------------------------------------------------------------------------------------

_RISKY_RE = re.compile(r"\^\s*\{?\s*[-+]?\d{4,}|\d{3,}\s*!|\\binom\s*\{\s*\d{4,}")


def _math_verify_equal(pred: str, truth: str) -> bool | None:
    """True/False from math_verify; None when it is unavailable, fails, or the input is refused (see module doc)."""
    try:
        from math_verify import parse, verify
    except Exception:  # pragma: no cover - math-verify is a core requirement
        return None
    on_main = threading.current_thread() is threading.main_thread()
    if not on_main:
        if len(pred) > MAX_VERIFY_CHARS or len(truth) > MAX_VERIFY_CHARS:
            return None
        if _RISKY_RE.search(pred) or _RISKY_RE.search(truth):
            return None
    timeout = MATH_VERIFY_TIMEOUT_S if on_main else None
    try:
        # Wrapping in \boxed{} makes math_verify take the whole answer (boxed has extraction priority).
        gold = parse("\\boxed{" + truth + "}", parsing_timeout=timeout)
        target = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        if not gold or not target:
            return None
        return bool(verify(gold, target, timeout_seconds=timeout))
    except BaseException as exc:  # TimeoutException, ValueError (signal off main thread), sympy errors ...
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math_verify failed on %r vs %r: %r", pred, truth, exc)
        return None


def math_reward(completion, ground_truth) -> float:
    """1.0 when the completion's final answer equals ``ground_truth``, else 0.0.

    The answer is taken with ``extract_answer`` (no answer -> 0.0). A ground truth that itself contains
    ``\\boxed{}`` is reduced to the box content. Equivalence: math_verify first, then the conservative normalizer
    (``answers_match``) when math_verify fails or disagrees. Never raises on model output.
    """
    pred = extract_answer(completion)
    if pred is None or ground_truth is None:
        return 0.0
    truth = str(ground_truth).strip()
    if _BOX_RE.search(truth):
        truth = extract_answer(truth) or truth
    truth = _strip_outer(truth)
    if not truth:
        return 0.0
    if _math_verify_equal(pred, truth):
        return 1.0
    try:
        return 1.0 if answers_match(pred, truth) else 0.0
    except Exception:  # pragma: no cover - defensive: the normalizer is pure string code
        return 0.0


# ----------------------------------------------------------------------------------------------------------------
# math_dapo: upstream's strict "Answer:" rule
# ----------------------------------------------------------------------------------------------------------------

#: How much of the end of a completion math_dapo reads (upstream: the longest MATH-500 answer is far shorter).
DAPO_TAIL_CHARS = 300
_DAPO_ANSWER_RE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")
# Minerva-style normalization (Lewkowycz et al. 2022, appendix): drop articles, spaces, dollar signs, unit and
# filler words, unwrap \text / \textbf / \overline / \boxed, complete shorthand \frac and \sqrt, drop thousands
# separators of plain integers.
_DAPO_REPLACE = ((r"\ ", ""), ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_DAPO_DROP = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
              "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
              "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
              "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}",
              "\\;", ",\\!", "{,}", '"', "\\dots")


def normalize_dapo_answer(answer: str) -> str:
    """The normalized form math_dapo compares: the part after the last '=', then the Minerva rules above."""
    text = str(answer).split("=")[-1]
    for old, new in _DAPO_REPLACE:
        text = text.replace(old, new)
    for word in _DAPO_DROP:
        text = text.replace(word, "")
    text = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", text)  # keep the first $...$ span
    for command in ("text", "textbf", "overline"):
        text = re.sub(r"(\\" + command + r"\{)(.*?)(\})", r"\2", text)
    text = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", text)
    text = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", text)
    text = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def math_dapo_reward(completion, ground_truth) -> float:
    """Upstream's ``math_dapo`` rule: 1.0 when the last ``Answer: ...`` line among the completion's final
    ``DAPO_TAIL_CHARS`` characters equals the ground truth after ``normalize_dapo_answer`` (exact string match, no
    symbolic equivalence), else 0.0. Upstream's score is +1/-1 with accuracy 1/0; this returns the accuracy, which
    is what upstream's validation averages and what its reward weighting uses (rewards > 0 count as 1)."""
    if completion is None or ground_truth is None:
        return 0.0
    found = _DAPO_ANSWER_RE.findall(str(completion)[-DAPO_TAIL_CHARS:])
    if not found:
        return 0.0
    return 1.0 if normalize_dapo_answer(found[-1]) == normalize_dapo_answer(str(ground_truth)) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {"math": math_reward, "math_dapo": math_dapo_reward}
#: upstream's REWARD_FUNCTION names
REWARD_ALIASES = {"math_reward": "math"}


def get_reward_fn(name: str) -> Callable[..., float]:
    """The reward function registered under ``name`` (``REWARD_FUNCTIONS``); ValueError listing the known names."""
    key = str(name).strip().lower() if name is not None else ""
    key = REWARD_ALIASES.get(key, key)
    if key not in REWARD_FUNCTIONS:
        raise ValueError(
            f"Unknown reward function {name!r}; available: {sorted(REWARD_FUNCTIONS)}. "
            "Register a new one by adding it to opsd.reward.REWARD_FUNCTIONS."
        )
    return REWARD_FUNCTIONS[key]
