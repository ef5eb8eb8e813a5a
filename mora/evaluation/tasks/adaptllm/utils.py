"""Scoring for the AdaptLLM biomedicine and finance tasks (MoRA Tables 6 and 7), written for lm-eval's pipeline.

The hub datasets `AdaptLLM/medicine-tasks` and `AdaptLLM/finance-tasks` hold ready-made prompts (`input`, with any
few-shot demonstrations already filled in). AdaptLLM's own evaluation (microsoft/LMOps, adaptllm/) scores them as:

* classification (`options`, `gold_index`): the option whose continuation " <option>" has the lowest mean loss per
  token after `input` wins; accuracy (PubMedQA, USMLE), micro-F1 (RCT), weighted F1 (FPB, FiQA SA), and for Headline
  the weighted F1 of each of its 9 questions (`class_id`) averaged over the questions;
* NER and ConvFinQA (`label`): greedy generation up to a newline; NER by an entity-level F1 (MUC style, averaged over
  documents), ConvFinQA by matching numbers within 1e-2.

lm-eval's loglikelihood results carry a summed log-probability and a greedy flag, not the continuation's token
count, so the mean per-token loss is used only when a response says how many tokens it scored (`num_tokens`
attribute, see `option_scores`); otherwise the log-probability is divided by the option's length in characters, the
normalisation of lm-eval's `acc_norm`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

from sklearn.metrics import f1_score

# ---------------------------------------------------------------------------------------------------------------
# Classification: options scored by mean loss


def option_scores(options: Sequence[str], results: Sequence) -> list[float]:
    """Mean log-probability of each option's continuation (higher is better; argmax = lowest mean loss).

    Each result is lm-eval's (loglikelihood, is_greedy). An LM that also knows how many continuation tokens it scored
    can return a tuple subclass with a `num_tokens` attribute; then the mean is per token, as in AdaptLLM. Without it
    the mean is per character of the option (lm-eval's acc_norm)."""
    if len(options) != len(results):
        raise ValueError(f"{len(options)} options but {len(results)} loglikelihood results")
    scores = []
    for option, result in zip(options, results, strict=True):
        loglik = float(result[0])
        num_tokens = getattr(result, "num_tokens", None)
        length = num_tokens if num_tokens else max(len(option), 1)
        scores.append(loglik / length)
    return scores


def predict(doc: dict, results: Sequence) -> int:
    """Index of the chosen option; ties go to the first (as torch.argmin does in AdaptLLM)."""
    scores = option_scores(doc["options"], results)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def process_acc(doc: dict, results: Sequence) -> dict:
    return {"acc": float(predict(doc, results) == int(doc["gold_index"]))}


def process_f1_micro(doc: dict, results: Sequence) -> dict:
    return {"f1_micro": (int(doc["gold_index"]), predict(doc, results))}


def process_f1_weighted(doc: dict, results: Sequence) -> dict:
    return {"f1_weighted": (int(doc["gold_index"]), predict(doc, results))}


def process_headline(doc: dict, results: Sequence) -> dict:
    return {"f1_weighted_by_question": (int(doc["class_id"]), int(doc["gold_index"]), predict(doc, results))}


def f1_micro(items: Sequence[tuple[int, int]]) -> float:
    golds, preds = zip(*items, strict=True)
    return float(f1_score(golds, preds, average="micro"))


def f1_weighted(items: Sequence[tuple[int, int]]) -> float:
    golds, preds = zip(*items, strict=True)
    return float(f1_score(golds, preds, average="weighted"))


def f1_weighted_by_question(items: Sequence[tuple[int, int, int]]) -> float:
    """Headline: weighted F1 within each question (class_id), then the plain mean over the questions present.
    AdaptLLM divides by a fixed 9; the hub test split has all 9, so the two agree there."""
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for class_id, gold, pred in items:
        groups[class_id].append((gold, pred))
    return sum(f1_weighted(pairs) for pairs in groups.values()) / len(groups)


# ---------------------------------------------------------------------------------------------------------------
# NER: "<word> (<type>)" pairs, MUC-style F1 per document

# A run of non-space characters, whitespace, then a parenthesised type without spaces: "Bank (organization)".
# Only the word right before the parenthesis is the entity's text ("Silver Creek Bank (organization)" -> "Bank").
_ENTITY = re.compile(r"(\S+)\s+\((\S+)\)")


def parse_entities(text: str) -> list[tuple[str, str]]:
    """Unique (text, type) pairs in order of first appearance."""
    seen: list[tuple[str, str]] = []
    for name, kind in _ENTITY.findall(text):
        if (name, kind) not in seen:
            seen.append((name, kind))
    return seen


def entity_f1(gold_text: str, pred_text: str) -> float:
    """MUC-style F1 of one document, scored on two axes as AdaptLLM does (with the `nereval` package and every entity
    placed at offset 0): a gold entity earns one point for a predicted entity with the same text and one for a
    predicted entity with the same type (the offsets always overlap, so the type axis ignores the text), both from
    the first predicted entity that matches it on either axis. Precision = points / (2 x predicted), recall = points
    / (2 x gold); a document without gold or predicted entities scores 0."""
    gold, pred = parse_entities(gold_text), parse_entities(pred_text)
    points = 0
    for g_name, g_type in gold:
        for p_name, p_type in pred:
            same_text, same_type = g_name == p_name, g_type == p_type
            points += same_text + same_type
            if same_text or same_type:
                break
    precision = points / (2 * len(pred)) if pred else 0.0
    recall = points / (2 * len(gold)) if gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def gold_label(doc: dict) -> str:
    """The gold completion; AdaptLLM also accepts a list of them and scores against the first."""
    label = doc["label"]
    return label if isinstance(label, str) else label[0]


def process_ner(doc: dict, results: Sequence[str]) -> dict:
    return {"entity_f1": entity_f1(gold_label(doc), results[0])}


# ---------------------------------------------------------------------------------------------------------------
# ConvFinQA: numbers on the first line, tolerance 1e-2

# Optional sign, optional leading point, digits with optional ",ddd" groups, optional fraction, optional exponent,
# any number of "%" (each divides by 100).
_NUMBER = re.compile(r"[-+]?\.?\d+(?:,\d{3})*\.?\d*(?:[eE][-+]?\d+)?%*")


def first_line_numbers(text: str) -> list[float]:
    line = text.split("\n")[0].strip()
    numbers = []
    for token in _NUMBER.findall(line):
        percents = len(token) - len(token.rstrip("%"))
        numbers.append(float(token.rstrip("%").replace(",", "")) / 100**percents)
    return numbers


def numbers_match(gold_text: str, pred_text: str) -> bool:
    """True if any number on the prediction's first line is within 1e-2 of the first number of the gold answer.
    A gold answer without a number can never be matched."""
    gold, pred = first_line_numbers(gold_text), first_line_numbers(pred_text)
    if not gold:
        return False
    return any(math.isclose(p, gold[0], abs_tol=1e-2) for p in pred)


def process_convfinqa(doc: dict, results: Sequence[str]) -> dict:
    return {"exact_match_num": float(numbers_match(gold_label(doc), results[0]))}
