"""Table 1's columns as lm-eval benchmarks (PAPER.md §4), and their scores on an in-memory model.

A column is the mean of its parts (BioMed. = mean of PubMedQA, USMLE, BioMMLU, RCT; Finance = mean of five); a
part is the mean of its benchmarks weighted by their number of documents (MMLU and BioMMLU pool their subjects,
as lm-eval's `mmlu` group does with weight_by_size). The per-part scores are Tables 6 and 7.

Choices (README, "Table 1"):
- MMLU 0/5: lm-eval's own `mmlu_<subject>` tasks (cais/mmlu, 57 subjects), 0- and 5-shot.
- BioMMLU: the six biomedical MMLU subjects of MultiMedQA (anatomy, clinical knowledge, college biology, college
  medicine, medical genetics, professional medicine), 5-shot as MMLU's standard protocol.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mora.evaluation import benchmarks as b
from mora.evaluation.harness import Benchmark, has_fixture, hub_dataset, lm_eval_tasks_dir, run_lm_eval

BIOMMLU_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)


def mmlu_subjects() -> list[str]:
    """The 57 subjects of lm-eval's mmlu (one task YAML each)."""
    folder = lm_eval_tasks_dir() / "mmlu" / "default"
    return sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))


def mmlu(subjects: Sequence[str], shots: int, prefix: str = "mmlu") -> list[Benchmark]:
    return [
        Benchmark(
            name=f"{prefix}_{s}_{shots}shot",
            task=f"mmlu_{s}",
            yaml=f"lm_eval:mmlu/default/mmlu_{s}.yaml",
            metric="acc,none",
            num_fewshot=shots,
            fixture=f"mmlu_{s}",
        )
        for s in subjects
    ]


@dataclass(frozen=True)
class Part:
    name: str  # a Table 6/7 column (pubmedqa, biommlu, fpb, ...) or the column itself
    benchmarks: tuple[Benchmark, ...]


@dataclass(frozen=True)
class Column:
    name: str
    title: str  # Table 1's header
    parts: tuple[Part, ...]


def columns() -> dict[str, Column]:
    subjects = mmlu_subjects()
    return {
        "mmlu_0": Column("mmlu_0", "MMLU 0", (Part("mmlu", tuple(mmlu(subjects, 0))),)),
        "mmlu_5": Column("mmlu_5", "MMLU 5", (Part("mmlu", tuple(mmlu(subjects, 5))),)),
        "gsm8k": Column("gsm8k", "GSM8K", (Part("gsm8k", (b.GSM8K,)),)),
        "math": Column("math", "MATH", (Part("math", (b.MATH,)),)),
        "biomed": Column(
            "biomed",
            "BioMed.",
            (
                Part("pubmedqa", (b.PUBMEDQA,)),
                Part("usmle", (b.USMLE,)),
                Part("biommlu", tuple(mmlu(BIOMMLU_SUBJECTS, 5, "biommlu"))),
                Part("rct", (b.RCT,)),
            ),
        ),
        "finance": Column(
            "finance",
            "Finance",
            tuple(Part(x.name, (x,)) for x in (b.CONVFINQA, b.FIQA_SA, b.HEADLINE, b.NER, b.FPB)),
        ),
    }


def evaluate_columns(
    model: torch.nn.Module,
    tokenizer: Any,
    names: Sequence[str],
    source: str = "hub",
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """score_columns on an in-memory model (in eval mode meanwhile), through lm-eval's HF wrapper."""
    from mora.evaluation.lm import wrap

    was_training = model.training
    model.eval()
    try:
        return score_columns(wrap(model, tokenizer, batch_size, max_length), names, source, limit, gen_kwargs)
    finally:
        model.train(was_training)


def score_columns(
    lm: Any,
    names: Sequence[str],
    source: str = "hub",
    limit: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Scores (0-100) of the named columns and of their parts (`<column>/<part>`) on an lm-eval model, plus
    "details": lm-eval's results and config per benchmark. With source="fixture", benchmarks without a local
    fixture are skipped and listed under details["skipped"]; a part left with none is an error. None where lm-eval
    returns no results (a process of a multi-process run whose LOCAL_RANK is not 0)."""
    known = columns()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown evaluation column(s) {unknown} (task.eval.columns); choose from {sorted(known)}")
    chosen = [known[n] for n in names]
    skipped = []
    if source == "fixture":
        skipped = [b.name for c in chosen for p in c.parts for b in p.benchmarks if not has_fixture(b.fixture_name)]
    benchmarks = [b for c in chosen for p in c.parts for b in p.benchmarks if b.name not in skipped]
    results = run_lm_eval(lm, benchmarks, source=source, limit=limit, gen_kwargs=gen_kwargs)
    if results is None:
        return None
    scores: dict[str, Any] = {}
    for column in chosen:
        part_scores = []
        for part in column.parts:
            ran = [results[b.name] for b in part.benchmarks if b.name in results]
            if not ran:
                raise ValueError(f"column {column.name}: no benchmark of {part.name} could run (no fixture)")
            score = sum(r["score"] * r["n"] for r in ran) / sum(r["n"] for r in ran)
            part_scores.append(score)
            if len(column.parts) > 1:
                scores[f"{column.name}/{part.name}"] = score
        scores[column.name] = sum(part_scores) / len(part_scores)
    scores["details"] = {
        "processes": getattr(lm, "world_size", 1),  # lm-eval split the documents among them (mora.evaluation.lm)
        "source": source,
        "limit": limit,
        "gen_kwargs": dict(gen_kwargs) if gen_kwargs else None,
        "skipped": skipped,
        "benchmarks": results,
    }
    return scores


def require_cached(names: Sequence[str]) -> None:
    """Offline, every hub dataset the columns read must be in the local cache: checked before any training, one
    line naming the first one missing and how to get it."""
    import datasets

    from mora.models import MissingAssetError

    if os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    known = columns()
    sources = dict.fromkeys(hub_dataset(b) for n in names for p in known[n].parts for b in p.benchmarks)
    for path, name in sources:
        try:
            datasets.load_dataset_builder(path, name)
        except Exception:  # datasets raises several types for "not cached"; any of them means not usable offline
            raise MissingAssetError(
                f"evaluation dataset {path!r} ({name}) is not in the local Hugging Face cache and this machine is "
                "offline: on a networked machine run `make prefetch PROFILE=paper`, or set task.eval.source=fixture"
            ) from None
