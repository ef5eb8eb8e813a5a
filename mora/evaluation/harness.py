"""Benchmarks through lm-evaluation-harness on the in-memory model (PAPER.md §4), with no save-and-reload.

A benchmark is one lm-eval task YAML: lm-eval's own (`lm_eval:<path under lm_eval/tasks>`) or ours (a path under
`mora/evaluation/tasks/`), whose `dataset_path` is the real hub source. Every run goes through an overlay YAML
written to a work folder that `include:`s the task's YAML; with `source="fixture"` the overlay also swaps the
dataset for the local JSONL files in `mora/evaluation/fixtures/<benchmark>/<split>.jsonl` (same schema as the hub
source), so the tests run lm-eval's whole pipeline (prompts, filters, metrics) offline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
SOURCES = ("hub", "fixture")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    """One lm-eval task and the number we report from it."""

    name: str  # ours; also the fixture folder's name
    task: str  # the task name its YAML defines
    yaml: str  # "lm_eval:<path under lm_eval/tasks>" or a path relative to mora/evaluation/tasks
    metric: str  # key in lm-eval's results, e.g. "acc,none" or "exact_match,flexible-extract"
    num_fewshot: int | None = None  # None: the YAML's own
    fixture: str | None = None  # the fixture folder, when not `name` (one task run at several shot counts)

    @property
    def fixture_name(self) -> str:
        return self.fixture or self.name

    def yaml_path(self) -> Path:
        if self.yaml.startswith("lm_eval:"):
            return lm_eval_tasks_dir() / self.yaml.removeprefix("lm_eval:")
        return TASKS_DIR / self.yaml


def has_fixture(name: str) -> bool:
    return any((FIXTURES_DIR / name).glob("*.jsonl"))


def fixture_files(name: str) -> dict[str, Path]:
    """The local splits of a benchmark's fixture: {split: file}."""
    folder = FIXTURES_DIR / name
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    if not files:
        raise ValueError(f"benchmark {name!r} has no fixture in {folder} (expected <split>.jsonl files)")
    return files


def overlay_yaml(base: Path, task: str, out_dir: Path, data_files: Mapping[str, Path] | None = None) -> Path:
    """A task YAML that includes `base` and, given data_files, reads those local JSONL files instead of its hub
    dataset (splits keep their names, so test_split / fewshot_split still apply)."""
    config: dict[str, Any] = {"include": str(base), "task": task}
    if data_files is not None:
        config.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {split: str(path) for split, path in data_files.items()}},
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def task_manager(benchmarks: Sequence[Benchmark], source: str, work_dir: Path):
    """An lm-eval TaskManager that sees exactly these benchmarks (overlays in work_dir; lm-eval's 14k built-in
    tasks are not indexed)."""
    from lm_eval.tasks import TaskManager

    if source not in SOURCES:
        raise ValueError(f"unknown evaluation source {source!r}; choose one of {', '.join(SOURCES)}")
    for b in benchmarks:
        base = b.yaml_path()
        if not base.is_file():
            raise ValueError(f"benchmark {b.name!r}: task YAML {base} does not exist")
        overlay_yaml(base, b.task, work_dir, fixture_files(b.fixture_name) if source == "fixture" else None)
    return TaskManager(include_path=str(work_dir), include_defaults=False)


def run_lm_eval(
    lm: Any,
    benchmarks: Sequence[Benchmark],
    source: str = "hub",
    limit: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> dict | None:
    """Run the benchmarks on an lm-eval model object (HFLM or any lm_eval.api.model.LM); one simple_evaluate per
    distinct num_fewshot; gen_kwargs update every generative task's generation_kwargs (e.g. max_gen_toks).
    Returns {benchmark name: {"score": metric x 100, "metric": key, "results": lm-eval's
    results dict of the task, "config": the task config lm-eval ran, "n": samples}}; None in a process whose
    LOCAL_RANK is not 0 (lm-eval returns results there only)."""
    import lm_eval

    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names repeat: {names}")
    out: dict[str, dict[str, Any]] = {}
    reported = True
    groups: dict[int | None, list[Benchmark]] = {}
    for b in benchmarks:
        groups.setdefault(b.num_fewshot, []).append(b)
    for shots, group in groups.items():
        with tempfile.TemporaryDirectory(prefix="mora-lm-eval-") as tmp:
            manager = task_manager(group, source, Path(tmp))
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=[b.task for b in group],
                num_fewshot=shots,
                task_manager=manager,
                limit=limit,
                gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        if result is None:  # lm-eval reports on rank 0 only; the others go on to the next group, whose collectives
            reported = False  # need every process, and get the results later
            continue
        for b in group:
            results = result["results"][b.task]
            if b.metric not in results:
                raise ValueError(f"benchmark {b.name!r}: lm-eval reported {sorted(results)}, not {b.metric!r}")
            out[b.name] = {
                "score": 100.0 * float(results[b.metric]),
                "metric": b.metric,
                "num_fewshot": shots,
                "n": result["n-samples"][b.task]["effective"],
                "results": _jsonable(results),
                "config": _jsonable(result["configs"][b.task]),
            }
    return out if reported else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def hub_dataset(benchmark: Benchmark) -> tuple[str, str | None]:
    """The (dataset_path, dataset_name) a benchmark reads from the hub, as lm-eval's YAML loader resolves its
    includes (functions are not imported)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval internal; the loader TaskManager itself uses

    config = load_yaml(benchmark.yaml_path(), resolve_func=False)
    return str(config["dataset_path"]), config.get("dataset_name")
