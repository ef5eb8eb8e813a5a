"""GSM8K and MATH for a model fine-tuned on MetaMathQA with the Alpaca template (PAPER.md §2.4, §4).

Prompt: `mora.prompts.alpaca_prompt(question)`, the template the model was trained with, 0-shot.

Answer extraction follows MetaMath's own evaluation (github meta-math/MetaMath, eval_gsm8k.py / eval_math.py),
because MetaMathQA responses end with "The answer is: X":

* GSM8K: the first number in the text after the last "The answer is: " (commas dropped, "a/b" evaluated,
  rounded to an integer as MetaMath does), compared numerically with the number after "#### " in the gold answer.
* MATH: the text after the last "The answer is: ", cut at the first ".\\n", stripped, one trailing "." removed;
  the gold answer is the last \\boxed{...} of the reference solution.

Each task reports two metrics (both 0/1 per document, averaged):

* `metamath_acc`: MetaMath's scripts: no "The answer is: " -> wrong; MATH equivalence is MetaMath's
  Hendrycks-style normalised string equality (`is_equiv`, reimplemented below, checked against MetaMath's util.py).
  One deliberate difference: the MATH gold answer is also read from "\\fbox{...}" and "\\boxed x" (MetaMath's
  remove_boxed returns None there, so those rows can never count as correct).
* `exact_match` (the number we report): the same extraction with a fallback when the marker is missing (GSM8K: the
  last number in the completion; MATH: the last \\boxed{...}); for MATH an answer also counts as correct when
  math-verify (sympy-based, no lm-eval[math] needed) finds it equivalent to the gold answer. So
  exact_match >= metamath_acc on every document.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from mora.prompts import alpaca_prompt

ANSWER_MARKER = "The answer is: "


# ---------------------------------------------------------------- prompts and targets


def doc_to_text(doc: dict) -> str:
    """GSM8K (`question`) or MATH (`problem`) in the Alpaca template the model was trained with."""
    return alpaca_prompt(doc["question"] if "question" in doc else doc["problem"])


def gsm8k_gold(doc: dict) -> str:
    """The number after "#### " in a GSM8K answer, without thousands separators."""
    return doc["answer"].split("#### ")[-1].strip().replace(",", "")


def math_gold(doc: dict) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) of a MATH solution."""
    return remove_boxed(last_boxed_only_string(doc["solution"]))


# ---------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")  # MetaMath's eval_gsm8k.py pattern


def _to_number(text: str) -> int | None:
    """MetaMath's conversion of a matched number: commas dropped, a/b evaluated, rounded to an integer."""
    if "/" in text:
        numerator, denominator = text.replace(",", "").split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if float(denominator) == 0:
            return round(float(numerator))
        return round(float(Fraction(f"{numerator}/{denominator}")))
    value = float(text.replace(",", ""))
    if value == float("inf"):
        return None
    return round(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def extract_gsm8k_metamath(completion: str) -> int | None:
    """MetaMath's `extract_answer_number`: first number after the last "The answer is: ", else None."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    match = _NUMBER.search(parts[-1].strip())
    return _to_number(match.group()) if match else None


def extract_gsm8k(completion: str) -> int | None:
    """MetaMath's extraction; without the marker, the last number anywhere in the completion."""
    if ANSWER_MARKER in completion:
        return extract_gsm8k_metamath(completion)
    numbers = _NUMBER.findall(completion)
    return _to_number(numbers[-1]) if numbers else None


def _gsm8k_correct(pred: int | None, gold: str) -> bool:
    return pred is not None and float(pred) == float(gold)


def process_results_gsm8k(doc: dict, results: list[str]) -> dict[str, int]:
    completion, gold = results[0], gsm8k_gold(doc)
    return {
        "exact_match": int(_gsm8k_correct(extract_gsm8k(completion), gold)),
        "metamath_acc": int(_gsm8k_correct(extract_gsm8k_metamath(completion), gold)),
    }


# ---------------------------------------------------------------- MATH: extraction


def extract_math_metamath(completion: str) -> str | None:
    """MetaMath's eval_math.py: text after the last "The answer is: ", up to the first ".\\n", stripped, without
    a trailing "."; None without the marker."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def extract_math(completion: str) -> str | None:
    """MetaMath's extraction; without the marker, the content of the last \\boxed{...}."""
    if ANSWER_MARKER in completion:
        return extract_math_metamath(completion)
    return remove_boxed(last_boxed_only_string(completion))


def last_boxed_only_string(text: str) -> str | None:
    """The last "\\boxed{...}" (or "\\fbox{...}") of a text, braces balanced; "\\boxed 5" also counts."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    if text.startswith("\\boxed ", idx):  # "\boxed 5" (no braces)
        return "\\boxed " + text[idx + len("\\boxed ") :].split("$")[0]
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    if boxed is None:
        return None
    for left in ("\\boxed ", "\\boxed{", "\\fbox{"):
        if boxed.startswith(left):
            inner = boxed[len(left) :]
            if left.endswith("{"):
                if not inner.endswith("}"):
                    return None
                inner = inner[:-1]
            return inner
    return None


# ---------------------------------------------------------------- MATH: MetaMath / Hendrycks string equivalence
# A reimplementation of the normalisation in MetaMath's util.py (itself Hendrycks et al.'s MATH code), kept
# behaviour-for-behaviour, including which malformed inputs make `is_equiv` fall back to raw string equality.


def _fix_fracs(string: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}."""
    pieces = string.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece.startswith("{"):
            out += piece
            continue
        if len(piece) < 2:
            return string
        a, b, rest = piece[0], piece[1], piece[2:]
        out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
    return out


def _fix_a_slash_b(string: str) -> str:
    """ "3/4" -> \\frac{3}{4} (integers only; other a/b raise, as in MetaMath, which is_equiv catches)."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    a, b = int(parts[0]), int(parts[1])  # ValueError for non-integers, as MetaMath's code
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    """ "5 \\text{ cm}" -> "5 " (MATH writes units as "\\text{ unit}")."""
    if "\\text{ " in string:
        parts = string.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one unit")  # MetaMath asserts; is_equiv catches it
        return parts[0]
    return string


def _fix_sqrt(string: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    if "\\sqrt" not in string:
        return string
    pieces = string.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\sqrt" + (piece if piece.startswith("{") else "{" + piece[0] + "}" + piece[1:])
    return out


def strip_string(string: str) -> str:
    """MetaMath's / Hendrycks's answer normalisation."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:  # "k = 3" -> " 3"
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(pred: str | None, gold: str | None) -> bool:
    """MetaMath's `is_equiv`: equal after `strip_string`; raw equality if normalising raises."""
    if pred is None and gold is None:
        return True
    if pred is None or gold is None:
        return False
    try:
        return strip_string(pred) == strip_string(gold)
    except Exception:
        return pred == gold


# ---------------------------------------------------------------- MATH: math-verify equivalence


def _as_latex(answer: str) -> str:
    answer = answer.strip()
    return answer if answer.startswith("$") or answer.startswith("\\(") else f"${answer}$"


def math_verify_equiv(pred: str | None, gold: str | None) -> bool:
    """Symbolic equivalence by math-verify (sympy + latex2sympy2_extended, which accepts antlr4 4.9.3 beside
    hydra-core). The signal-based timeouts work only in the main thread; elsewhere they are turned off."""
    if pred is None or gold is None or not pred.strip():
        return False
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - a missing dependency must not read as "wrong answer"
        raise ImportError(
            "MATH scoring needs math-verify==0.9.0 (with latex2sympy2_extended==1.11.0); pip install math-verify==0.9.0"
        ) from e
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
        pred_parsed = parse(_as_latex(pred), parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:
        return False


def process_results_math(doc: dict, results: list[str]) -> dict[str, int]:
    completion, gold = results[0], math_gold(doc)
    pred = extract_math(completion)
    return {
        "exact_match": int(pred is not None and (is_equiv(pred, gold) or math_verify_equiv(pred, gold))),
        "metamath_acc": int(is_equiv(extract_math_metamath(completion), gold) if gold is not None else 0),
    }
