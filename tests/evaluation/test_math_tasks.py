"""GSM8K and MATH (Alpaca prompt, MetaMath extraction) through lm-eval's whole pipeline on the local fixtures, with
a stub model whose generations are scripted per document; the expected scores were worked out by hand."""

from __future__ import annotations

import pytest
import yaml
from lm_eval.api.model import LM

from mora.evaluation.benchmarks import GSM8K, MATH
from mora.evaluation.harness import TASKS_DIR, run_lm_eval
from mora.prompts import alpaca_prompt
from tests.evaluation.common import fixture_rows, task_utils

utils = task_utils("math")


class ScriptedLM(LM):
    """Answers each prompt with the completion scripted for it; records every request."""

    def __init__(self, script: dict[str, str]):
        super().__init__()
        self.script = script
        self.requests: list[tuple[str, dict]] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            self.requests.append((context, gen_kwargs))
            out.append(self.script[context])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("GSM8K and MATH only generate")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("GSM8K and MATH only generate")


# GSM8K, one completion per fixture row (gold in the comment). exact_match: 7/10; metamath_acc: 6/10.
GSM8K_COMPLETIONS = [
    # 5: correct, MetaMath form
    "She sells and gives away 15 + 4 = 19 muffins.\nSo she has 24 - 19 = 5 muffins left.\nThe answer is: 5",
    # 14: a "$" before the number is skipped by the number pattern
    "The notebooks cost 3 * 4 = $12.\nHe spends 12 + 2 = $14 in total.\nThe answer is: $14",
    # 34: wrong number
    "42 - 17 = 25 students remain, then 9 get on: 25 + 8 = 33.\nThe answer is: 33",
    # 25: no marker -> exact_match falls back to the last number (25); MetaMath: wrong
    "She needs 300 / 12 = 25 days to finish the book.",
    # 450: "450.00" rounds to 450
    "He fills 1250 / 50 = 25 boxes and makes 25 * 18 = 450 dollars.\nThe answer is: 450.00",
    # 100: marker but no number -> wrong for both
    "Each week he runs 15 + 10 = 25 miles, so in 4 weeks he runs 4 * 25 miles.\nThe answer is: one hundred",
    # 60: two markers -> the last one counts
    "The discount is 80 * 0.25 = 20.\nThe answer is: 20\nSo the sale price is 80 - 20 = 60.\nThe answer is: 60",
    # 65: no marker and the last number is not the answer -> wrong for both
    "Jo has 18 and Sam has 36, so together 11 + 18 + 36 = 65 marbles, which is 5 more than 60.",
    # 1050: thousands separator and a unit
    "It loses 150 * 9 = 1350 liters, so 2400 - 1350 = 1050 are left.\nThe answer is: 1,050 liters",
    # -6: negative
    "It drops 6 * 2 = 12 degrees, so at midnight it is 6 - 12 = -6 degrees.\nThe answer is: -6",
]

# MATH, one completion per fixture row. exact_match: 10/12; metamath_acc: 6/12.
MATH_COMPLETIONS = [
    # \frac{1}{2}: identical -> both
    "Subtracting 3 from both sides, we get $2x = 1$.\nDividing by 2, $x = \\boxed{\\frac{1}{2}}$.\n"
    "The answer is: \\frac{1}{2}",
    # \frac{1}{2} vs 0.5: Hendrycks' special case -> both
    "Multiplying, we get $\\frac{6}{12} = 0.5$.\nThe answer is: 0.5",
    # \frac{3}{4} vs 0.75: only math-verify
    "3 of the 4 marbles are red, so the probability is 3/4 = 0.75.\nThe answer is: 0.75",
    # 3\sqrt{2} vs \sqrt{18}: only math-verify
    "The distance is $\\sqrt{3^2 + 3^2} = \\sqrt{18}$.\nThe answer is: \\sqrt{18}",
    # \frac{5}{6} vs \dfrac56: Hendrycks normalisation -> both
    "$\\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$.\nThe answer is: \\dfrac56",
    # [2,5) vs "[2, 5)." (trailing period, spaces) -> both
    "We need $x \\ge 2$ and $x < 5$.\nThe answer is: [2, 5).",
    # 12 vs 13: wrong
    "$60 = 2^2 \\cdot 3 \\cdot 5$ has $3 \\cdot 2 \\cdot 2 + 1 = 13$ divisors.\nThe answer is: 13",
    # no marker, but a \boxed{} -> exact_match via the fallback; MetaMath: wrong
    "Using $(a+b)^2 = a^2 + 2ab + b^2$, $(x+1)^2 = \\boxed{x^2 + 2x + 1}$.",
    # 55 (a multi-line problem: Alpaca "### Input:" template) -> both
    "The sum is $\\frac{10 \\cdot 11}{2} = 55$.\nThe answer is: 55",
    # no marker and no \boxed{} -> wrong for both
    "31 is not divisible by 2, 3 or 5, so the smallest prime greater than 30 is 31",
    # 90^\circ vs 90 -> both
    "The angles add up to 180 degrees, so angle C is 180 - 35 - 55 = 90.\nThe answer is: 90",
    # \text{(C)} vs C: only math-verify
    "Parallel lines have the same slope, 2, and only option (C) has slope 2.\nThe answer is: C",
]


def scripted(name: str, completions: list[str]) -> ScriptedLM:
    rows = fixture_rows(name)
    assert len(rows) == len(completions)
    key = "question" if name == "gsm8k" else "problem"
    return ScriptedLM({alpaca_prompt(row[key]): text for row, text in zip(rows, completions, strict=True)})


@pytest.fixture(scope="module")
def results():
    """One run of both benchmarks through the harness (0-shot, fixture source)."""
    gsm8k_lm = scripted("gsm8k", GSM8K_COMPLETIONS)
    math_lm = scripted("math", MATH_COMPLETIONS)
    both = ScriptedLM({**gsm8k_lm.script, **math_lm.script})
    out = run_lm_eval(both, [GSM8K, MATH], source="fixture")
    return out, both


def test_gsm8k_score(results):
    out, _ = results
    assert out["gsm8k"]["n"] == 10
    assert out["gsm8k"]["metric"] == "exact_match,none"
    assert out["gsm8k"]["score"] == pytest.approx(70.0)
    assert out["gsm8k"]["results"]["metamath_acc,none"] == pytest.approx(0.6)


def test_math_score(results):
    out, _ = results
    assert out["math"]["n"] == 12
    assert out["math"]["score"] == pytest.approx(100 * 10 / 12)
    assert out["math"]["results"]["metamath_acc,none"] == pytest.approx(0.5)


def test_prompts_and_generation_settings(results):
    out, lm = results
    expected = {alpaca_prompt(r["question"]) for r in fixture_rows("gsm8k")}
    expected |= {alpaca_prompt(r["problem"]) for r in fixture_rows("math")}
    assert {context for context, _ in lm.requests} == expected  # exactly the Alpaca prompt, no few-shot prefix
    assert any("### Input:\n" in context for context, _ in lm.requests)  # multi-line MATH problem
    for context, kwargs in lm.requests:
        assert kwargs["do_sample"] is False
        assert "### Instruction:" in kwargs["until"]
        assert kwargs["max_gen_toks"] == (512 if context in scripted("gsm8k", GSM8K_COMPLETIONS).script else 1024)
    for name in ("gsm8k", "math"):
        assert out[name]["num_fewshot"] == 0


def test_doc_to_text_is_alpaca_prompt():
    gsm_row = fixture_rows("gsm8k")[0]
    math_row = fixture_rows("math")[8]
    assert utils.doc_to_text(gsm_row) == alpaca_prompt(gsm_row["question"])
    assert utils.doc_to_text(math_row) == alpaca_prompt(math_row["problem"])
    assert utils.doc_to_text(math_row).endswith("### Input:\n\\[\\sum_{k=1}^{10} k.\\]\n\n### Response:")


def test_yamls_name_the_real_hub_sources():
    gsm = yaml.load((TASKS_DIR / GSM8K.yaml).read_text(), Loader=yaml.BaseLoader)
    math = yaml.load((TASKS_DIR / MATH.yaml).read_text(), Loader=yaml.BaseLoader)
    assert (gsm["task"], gsm["dataset_path"], gsm["dataset_name"], gsm["test_split"]) == (
        "gsm8k_alpaca",
        "openai/gsm8k",
        "main",
        "test",
    )
    assert (math["task"], math["dataset_path"], math["dataset_name"], math["test_split"]) == (
        "math_alpaca",
        "DigitalLearningGmbH/MATH-lighteval",
        "default",
        "test",
    )
    for config in (gsm, math):
        assert config["metadata"]["version"]
        assert config["num_fewshot"] == "0"


@pytest.mark.parametrize("benchmark", [GSM8K, MATH], ids=lambda b: b.name)
def test_hub_overlay_resolves_to_the_hub_dataset(benchmark, tmp_path):
    """The harness's hub overlay, read by lm-eval's own YAML loader (include + !function resolved): the real hub
    dataset and our functions. (lm_eval.tasks._yaml_loader is lm-eval internal; the dataset is not downloaded.)"""
    from lm_eval.tasks._yaml_loader import load_yaml

    from mora.evaluation.harness import overlay_yaml

    config = load_yaml(overlay_yaml(benchmark.yaml_path(), benchmark.task, tmp_path))
    hub = {"gsm8k": ("openai/gsm8k", "main"), "math": ("DigitalLearningGmbH/MATH-lighteval", "default")}
    assert (config["dataset_path"], config["dataset_name"]) == hub[benchmark.name]
    assert config["task"] == benchmark.task and config["output_type"] == "generate_until"
    assert callable(config["doc_to_text"]) and callable(config["process_results"])
    assert "dataset_kwargs" not in config


def test_fixtures_have_the_hub_schema():
    for row in fixture_rows("gsm8k"):
        assert set(row) == {"question", "answer"} and "\n#### " in row["answer"]
    for row in fixture_rows("math"):
        assert set(row) == {"problem", "level", "solution", "type"} and utils.math_gold(row)


@pytest.mark.parametrize(
    ("completion", "metamath", "ours"),
    [
        ("The answer is: 18", 18, 18),
        ("The answer is: 24.6 dollars", 25, 25),  # MetaMath rounds to an integer
        ("The answer is: 3/4", 1, 1),  # fractions are evaluated, then rounded
        ("So 2 + 3 = 5 apples.", None, 5),  # no marker: only ours falls back (last number)
        ("The answer is: none", None, None),
        ("", None, None),
    ],
)
def test_gsm8k_extraction(completion, metamath, ours):
    assert utils.extract_gsm8k_metamath(completion) == metamath
    assert utils.extract_gsm8k(completion) == ours


@pytest.mark.parametrize(
    ("completion", "metamath", "ours"),
    [
        ("so x = 2.\nThe answer is: 2", "2", "2"),
        ("The answer is: \\frac{1}{2}.\nAnd more text", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("The answer is: 5.", "5", "5"),
        ("thus $\\boxed{\\frac{\\sqrt{3}}{2}}$", None, "\\frac{\\sqrt{3}}{2}"),  # fallback: last \boxed{}
        ("no answer here", None, None),
    ],
)
def test_math_extraction(completion, metamath, ours):
    assert utils.extract_math_metamath(completion) == metamath
    assert utils.extract_math(completion) == ours


@pytest.mark.parametrize(
    ("pred", "gold", "string_equiv", "symbolic_equiv"),
    [
        ("\\dfrac12", "\\frac{1}{2}", True, True),
        ("0.5", "\\frac{1}{2}", True, True),
        ("2/4", "\\frac{1}{2}", False, True),
        ("\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}", False, True),  # Hendrycks fixes \\frac12, not \\frac{..}2
        ("10\\%", "10", True, True),
        ("k = 3", "3", True, True),
        ("(x+1)^2", "x^2+2x+1", False, True),
        ("(1,2)", "(2,1)", False, False),
        ("6", "5", False, False),
    ],
)
def test_math_equivalence(pred, gold, string_equiv, symbolic_equiv):
    assert utils.is_equiv(pred, gold) is string_equiv
    assert utils.math_verify_equiv(pred, gold) is symbolic_equiv
