"""Table 1's columns through lm-eval: MMLU on its fixtures with a model whose answers are known, how parts and
columns aggregate, and merged vs unmerged adapters scoring the same on the in-memory model."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from lm_eval.api.model import LM
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mora
from mora.evaluation.columns import BIOMMLU_SUBJECTS, columns, evaluate_columns, mmlu_subjects, score_columns
from mora.evaluation.harness import FIXTURES_DIR
from mora.evaluation.lm import LoglikelihoodResult
from mora.tasks.tokenizer import fixture_bpe
from tests.evaluation.common import fixture_rows

FIXTURE_SUBJECTS = sorted(p.name.removeprefix("mmlu_") for p in FIXTURES_DIR.glob("mmlu_*"))


class AlwaysLetter(LM):
    """Prefers the continuation " <letter>" for every multiple-choice question; records the prompts it saw."""

    def __init__(self, letter: str) -> None:
        super().__init__()
        self.letter, self.contexts = letter, defaultdict(list)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for request in requests:
            context, continuation = request.args
            self.contexts[request.task_name].append(context)
            out.append((0.0 if continuation.strip() == self.letter else -1.0, False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("MMLU asks for loglikelihoods only")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("MMLU asks for loglikelihoods only")


def test_mmlu_columns_score_a_model_whose_answers_are_known():
    scores = score_columns(AlwaysLetter("A"), ["mmlu_0", "mmlu_5"], source="fixture")
    rows = [r for s in FIXTURE_SUBJECTS for r in fixture_rows(f"mmlu_{s}")]
    expected = 100 * sum(r["answer"] == 0 for r in rows) / len(rows)  # pooled over subjects (weighted by size)
    assert 0 < expected < 100
    assert scores["mmlu_0"] == pytest.approx(expected) and scores["mmlu_5"] == pytest.approx(expected)
    details = scores["details"]
    assert len(details["skipped"]) == 2 * (57 - len(FIXTURE_SUBJECTS))  # subjects without a fixture, listed
    ran = details["benchmarks"]
    assert {ran[f"mmlu_{s}_5shot"]["num_fewshot"] for s in FIXTURE_SUBJECTS} == {5}
    assert all(ran[f"mmlu_{s}_0shot"]["config"]["dataset_path"] == "json" for s in FIXTURE_SUBJECTS)


def test_mmlu_five_shot_prompts_hold_five_dev_examples():
    lm = AlwaysLetter("B")
    score_columns(lm, ["mmlu_5"], source="fixture")
    context = lm.contexts["mmlu_anatomy"][0]
    assert context.count("\nAnswer:") == 6  # five demonstrations from the dev split, then the question
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.")


def test_columns_are_the_papers():
    known = columns()
    assert list(known) == ["mmlu_0", "mmlu_5", "gsm8k", "math", "biomed", "finance"]
    assert len(mmlu_subjects()) == 57
    assert [p.name for p in known["biomed"].parts] == ["pubmedqa", "usmle", "biommlu", "rct"]
    assert [p.name for p in known["finance"].parts] == ["convfinqa", "fiqa_sa", "headline", "ner", "fpb"]
    biommlu = known["biomed"].parts[2].benchmarks
    assert [b.task for b in biommlu] == [f"mmlu_{s}" for s in BIOMMLU_SUBJECTS]
    assert all(b.yaml_path().is_file() for c in known.values() for p in c.parts for b in p.benchmarks)
    with pytest.raises(ValueError, match=r"unknown evaluation column\(s\) \['mmlu'\]"):
        score_columns(AlwaysLetter("A"), ["mmlu"], source="fixture")


def test_a_column_is_the_mean_of_its_parts(monkeypatch):
    import mora.evaluation.columns as c

    fake = {"pubmedqa": (80.0, 10), "usmle": (40.0, 4), "rct": (20.0, 50)}
    fake |= {f"biommlu_{s}_5shot": (60.0 if i % 2 else 30.0, 2 + i) for i, s in enumerate(BIOMMLU_SUBJECTS)}
    monkeypatch.setattr(c, "has_fixture", lambda name: True)
    monkeypatch.setattr(
        c, "run_lm_eval", lambda lm, bs, **_: {b.name: dict(zip(("score", "n"), fake[b.name], strict=True)) for b in bs}
    )
    scores = c.score_columns(None, ["biomed"], source="fixture")
    sizes = [2 + i for i in range(6)]
    biommlu = sum((60.0 if i % 2 else 30.0) * n for i, n in enumerate(sizes)) / sum(sizes)  # pooled by size
    assert scores["biomed/biommlu"] == pytest.approx(biommlu)
    assert scores["biomed"] == pytest.approx((80 + 40 + biommlu + 20) / 4)  # parts: unweighted, as Table 6's Avg.


def test_loglikelihood_results_carry_their_token_counts():
    result = LoglikelihoodResult((-3.5, False), 7)
    ll, greedy = result
    assert (ll, greedy, result.num_tokens) == (-3.5, False, 7)


def _tiny_llama(vocab_size: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.slow
def test_merged_and_unmerged_mora_score_the_same():
    tok = fixture_bpe()
    model = get_peft_model(
        _tiny_llama(len(tok), layers=2),
        mora.MoraConfig(r=2, compression="rope", target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mora_M" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: the scores must depend on it
    kwargs = dict(source="fixture", batch_size=8, limit=4, gen_kwargs={"max_gen_toks": 8})
    names = ["mmlu_0", "finance"]
    unmerged = evaluate_columns(model, tok, names, **kwargs)
    merged = evaluate_columns(model.merge_and_unload(), tok, names, **kwargs)
    assert {k: v for k, v in unmerged.items() if k != "details"} == pytest.approx(
        {k: v for k, v in merged.items() if k != "details"}, abs=1e-9
    )


@pytest.mark.slow
def test_token_counts_reach_adaptllms_scoring_through_lm_eval(monkeypatch):
    """With a real model behind our wrapper, every option's result reaches the task's process_results carrying the
    number of tokens it scored, so AdaptLLM's per-token rule (not the per-character fallback) decides."""
    from lm_eval.api.task import ConfigurableTask

    seen = []
    process_results = ConfigurableTask.process_results

    def record(self, doc, results):
        seen.append([getattr(r, "num_tokens", None) for r in results])
        return process_results(self, doc, results)

    monkeypatch.setattr(ConfigurableTask, "process_results", record)
    tok = fixture_bpe()
    scores = evaluate_columns(
        _tiny_llama(len(tok), layers=1), tok, ["finance"], source="fixture", limit=3, gen_kwargs={"max_gen_toks": 4}
    )
    assert 0 <= scores["finance"] <= 100
    classification = [counts for counts in seen if counts and counts[0] is not None]
    assert len(classification) == 3 * 3  # FiQA SA, Headline, FPB: 3 documents each
    assert all(n >= 1 for counts in classification for n in counts)
