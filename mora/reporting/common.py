"""What the table reporters share: where a table keeps its run records, gathering the kept records with new runs,
grouping finished runs by cell and point, picking the best point of each cell, mean ± std, and keeping the new runs'
records beside the tables.

A table's records (results/<table>/runs/<profile>/, committed) are never deleted or replaced by a report: a table
is built from them and from the runs under the runner's folder together, so a narrowed command (one cell, a new
seed) adds to a table and never shrinks it. The runner skips a run whose record is kept with the same config and
refuses one that a kept record of another config would have to make way for (experiments/reproduce.py)."""

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
# a method's name in a table, by the `method` of a run's summary (mora.adapters.build.method_name)
METHOD_NAMES = {
    "fft": "FFT", "lora": "LoRA", "dora": "DoRA", "mora": "MoRA", "hira": "HiRA", "miss": "MiSS",
    "randlora": "RandLoRA", "c3a": "C3A", "shira": "SHiRA", "gralora": "GraLoRA", "lokr": "LoKr",
}  # fmt: skip


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
    tuned: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Per cell, the runs (all seeds) of the point with the best mean score over seeds. `tuned`: where a cell's
    grid ran on its first seed alone and the other seeds only at that seed's best point (the runner's
    --at-best-of), the point is chosen by the first seed's score, so that one seed elsewhere cannot outbid it."""
    names = sorted((c["name"] for c in cells), key=len, reverse=True)  # lora-r8 must not claim loraplus-r8's runs
    by_cell: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell = next((n for n in names if run["dir"].name.startswith(n + "-lr")), None)
        if cell is not None:
            by_cell[cell][point(run)].append(run)

    def mean(group: list[dict[str, Any]]) -> float:
        return statistics.mean(score(r) for r in group)

    pick = min if lower_is_better else max
    chosen = {}
    for cell, points in by_cell.items():
        seeds = [{r["summary"]["seed"] for r in group} for group in points.values()]
        first = min(set.union(*seeds))
        if tuned and any(s != seeds[0] for s in seeds):
            runs_of_first = {p: [r for r in g if r["summary"]["seed"] == first] for p, g in points.items()}
            best = pick((p for p, g in runs_of_first.items() if g), key=lambda p: mean(runs_of_first[p]))
            chosen[cell] = points[best]
        else:
            chosen[cell] = pick(points.values(), key=mean)
    return chosen


def mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def kept(out: Path, profile: str, root: Path) -> Path:
    """Where a table written to `out` keeps the records of the runs under `root` (the runner's folder of one
    profile): out/runs/<profile>/, mirroring root (a table of several tasks: <task>/<run>)."""
    return out / "runs" / profile


def gather(root: Path, records: Path) -> list[dict[str, Any]]:
    """The finished runs a table is built from: the records kept in `records` and the runs under `root`, by folder
    name; where both hold a name, the kept record (the runner found it and did not run it again)."""
    runs = {run["dir"].name: run for run in load_runs(root)}
    runs.update({run["dir"].name: run for run in load_runs(records)})
    return [runs[name] for name in sorted(runs)]


def keep_records(runs: list[dict[str, Any]], records: Path, extra: tuple[str, ...] = ()) -> None:
    """Each run's records (and `extra` files where present) into records/<run folder name>/, for the runs not kept
    there yet. Nothing kept is deleted or overwritten."""
    for run in runs:
        target = records / run["dir"].name
        if run["dir"].resolve() == target.resolve() or target.exists():
            continue
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
