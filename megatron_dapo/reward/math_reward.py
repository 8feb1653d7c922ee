"""DAPO-Math rule-based reward: +1 if the extracted answer equals the ground truth, −1 otherwise.

Extraction follows the DAPO reference scorer: only the last ``TAIL_CHARS`` characters of the response are
read; the last ``Answer: <value>`` line wins (Minerva style), else the last ``\\boxed{...}``. Integer answers
(all of DAPO-Math-17K) are compared as integers (``"19"``, ``"19."``, ``" 019 "``, ``"19.0"``, ``"1,000"``,
and an integer followed by unit words: ``"100 dollars"``, ``"5 \\text{ points}"``, ``"90^\\circ"``, ``"50\\%"``,
as the reference recipe's normaliser strips units); anything else goes through math-verify under a time
bound (math-verify would read a unit word as a product of symbols). Looking only at the tail bounds the work for
huge responses; math-verify's own time-outs bound adversarial LaTeX.
"""

from __future__ import annotations

import re
import threading
from typing import TypedDict

TAIL_CHARS = 300
MATH_VERIFY_TIMEOUT_SECONDS = 2

_ANSWER_LINE = re.compile(r"Answer\s*:\s*([^\n]*)", re.IGNORECASE)
_INTEGER = re.compile(r"^[+-]?\d+$")
_INTEGRAL_DECIMAL = re.compile(r"^([+-]?\d+)\.0*$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+$")
_NUMBER_THEN_REST = re.compile(r"^([+-]?\d[\d,]*(?:\.0*)?)\s*(.+)$")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_DEGREES_OR_PERCENT = re.compile(r"^(?:\^\s*\{?\s*\\circ\s*\}?|\\?%)")
# Words that are mathematics, not units: "2 pi" is 2π, "3 sqrt" is no unit.
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "frac", "cdot", "times", "i", "e"}
_SHORT_UNITS = {"m", "cm", "mm", "km", "g", "kg", "mg", "s", "h", "hr", "hrs", "min", "ft", "yd", "mi", "oz", "lb",
                "lbs", "ml", "l", "mph", "kph", "sq", "cu", "am", "pm"}


class Score(TypedDict):
    score: float
    acc: bool
    pred: str | None
    timed_out: bool


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces matched), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(response: str) -> str | None:
    """The answer string the response commits to, or ``None`` when it commits to none."""
    tail = response[-TAIL_CHARS:]
    lines = _ANSWER_LINE.findall(tail)
    if lines:
        answer = lines[-1].strip()
        boxed = last_boxed_content(answer)
        answer = boxed if boxed is not None else answer
        answer = answer.strip().strip("$").strip()
        return answer or None
    boxed = last_boxed_content(tail)
    return boxed.strip() if boxed else None


def _only_units(rest: str) -> bool:
    """Whether what follows a number is nothing but unit words (``dollars``, ``\\text{ cm}``, ``^\\circ``, ``%``)."""
    rest = _TEXT_MACRO.sub(r" \1 ", rest).replace("\\ ", " ").replace("~", " ").strip()
    rest = _DEGREES_OR_PERCENT.sub(" ", rest).strip()
    words = [word.strip(".,;").lower() for word in rest.split()]
    return all(
        word.isalpha() and word not in _MATH_WORDS and (len(word) >= 3 or word in _SHORT_UNITS) for word in words
    )


def normalize_integer(text: str) -> int | None:
    """The integer a string denotes (``"019"``, ``"19."``, ``"19.0"``, ``"1,000"``, ``"100 dollars"``), or ``None``."""
    text = text.strip().strip("$").strip().rstrip(".").strip()
    number_then_rest = _NUMBER_THEN_REST.match(text)
    if number_then_rest and _only_units(number_then_rest.group(2)):
        text = number_then_rest.group(1).rstrip(".")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if _INTEGER.match(text):
        return int(text)
    decimal = _INTEGRAL_DECIMAL.match(text)
    if decimal:
        return int(decimal.group(1))
    return None


def _math_verify_equal(pred: str, ground_truth: str) -> tuple[bool, bool]:
    """(equal, timed_out) by math-verify. Its signal-based time-outs work only in the main thread."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_SECONDS if in_main else None
    try:
        gold = parse(f"${ground_truth}$", parsing_timeout=timeout, raise_on_error=True)
        target = parse(f"${pred}$", parsing_timeout=timeout, raise_on_error=True)
        return bool(verify(gold, target, timeout_seconds=timeout, raise_on_error=True)), False
    except (TimeoutError, TimeoutException):
        return False, True
    except Exception:  # math-verify raises many kinds of parse errors; an unparseable answer is wrong
        return False, False


def compute_score(response: str, ground_truth: str, **extra: object) -> Score:
    """Score one response: ``{score: ±1.0, acc: bool, pred: extracted answer or None, timed_out: bool}``.

    ``extra``: the data row's other fields (the ``reward.function`` contract); this reward uses none.
    """
    pred = extract_answer(response)
    if pred is None:
        return Score(score=-1.0, acc=False, pred=None, timed_out=False)
    gt_int, pred_int = normalize_integer(str(ground_truth)), normalize_integer(pred)
    timed_out = False
    if gt_int is not None and pred_int is not None:
        acc = gt_int == pred_int
    else:
        acc, timed_out = _math_verify_equal(pred, str(ground_truth))
    return Score(score=1.0 if acc else -1.0, acc=acc, pred=pred, timed_out=timed_out)
