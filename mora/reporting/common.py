"""What the table reporters share: grouping finished runs by cell and point, picking the best point of each cell,
mean ± std, and copying the run records beside the tables."""

from __future__ import annotations

import json
import shutil
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RECORDS = ("config.yaml", "env.json", "summary.json", "metrics.jsonl")


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Finished runs under root: summary, config and metrics of each."""
    runs = []
    for summary_path in sorted(root.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "finished":
            continue
        folder = summary_path.parent
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        config = yaml.safe_load((folder / "config.yaml").read_text())
        runs.append({"dir": folder, "summary": summary, "metrics": metrics, "config": config})
    return runs


def point(run: dict[str, Any]) -> str:
    """The run's learning rate and search point: its folder name without the seed."""
    return run["dir"].name.rsplit("-s", 1)[0]


def best_points(
    runs: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    score: Callable[[dict[str, Any]], float],
    lower_is_better: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Per cell, the runs (all seeds) of the point with the best mean score over seeds."""
    names = sorted((c["name"] for c in cells), key=len, reverse=True)  # lora-r8 must not claim loraplus-r8's runs
    by_cell: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell = next((n for n in names if run["dir"].name.startswith(n + "-lr")), None)
        if cell is not None:
            by_cell[cell][point(run)].append(run)

    def mean(group: list[dict[str, Any]]) -> float:
        return statistics.mean(score(r) for r in group)

    pick = min if lower_is_better else max
    return {cell: pick(points.values(), key=mean) for cell, points in by_cell.items()}


def mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def copy_records(runs: list[dict[str, Any]], kept: Path, extra: tuple[str, ...] = ()) -> None:
    """Each run's records (and `extra` files where present) into kept/<run folder name>/, replacing kept. Runs that
    already lie in kept (a report rebuilt from the kept records themselves) are left as they are."""
    if any(run["dir"].resolve().is_relative_to(kept.resolve()) for run in runs):
        return
    shutil.rmtree(kept, ignore_errors=True)
    for run in runs:
        target = kept / run["dir"].name
        target.mkdir(parents=True)
        for name in (*RECORDS, *extra):
            if (run["dir"] / name).exists():
                shutil.copy(run["dir"] / name, target / name)


def lr_cell(lr: float | None, grid: list[float]) -> str:
    """The chosen LR, marked where it sits at an edge of a grid of several (the optimum may lie beyond it)."""
    if lr is None:
        return "–"
    edge = " ↑" if len(grid) > 1 and lr == max(grid) else " ↓" if len(grid) > 1 and lr == min(grid) else ""
    return f"{lr:g}{edge}"
