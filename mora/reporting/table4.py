"""Table 4 from run folders: table4.md (the paper's GSM8K beside our scores per operator and rank) and table4.csv.

The score is the task's metric (GSM8K accuracy for MetaMath on the paper's profile, character accuracy for UUID
on tiny) at each run's last evaluation; per cell, the learning rate with the best mean over seeds
is reported, mean ± std over seeds. Only finished runs' records are read; nothing is typed by hand except the
paper's numbers (PAPER.md Table 4).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mora.reporting.common import best_points, gather, keep_records, kept, lr_cell, mean_std

OPERATORS = (  # (compression, the paper's row, its equation)
    ("truncation", "Truncation", "Eq. 4"),
    ("sharing", "Sharing", "Eq. 6"),
    ("decouple", "Decouple", "Eq. 8"),
    ("rope", "Rotation", "Eq. 9"),
)
PAPER_RANKS = (8, 256)
PAPER_TABLE4 = {"truncation": (59.5, 66.6), "sharing": (62.5, 67.9), "decouple": (63.6, 67.8), "rope": (64.2, 67.9)}
CSV_COLUMNS = ("source", "operator", "rank", "metric", "score", "seed", "our_rank")


METRICS = {"metamath": "gsm8k", "uuid": "char_acc"}  # the score reported per task


def metric(tasks: list[str]) -> str:
    if len(tasks) != 1 or tasks[0] not in METRICS:
        raise ValueError(f"Table 4 reports one task of {', '.join(METRICS)}, got {tasks}")
    return METRICS[tasks[0]]


def score(run: dict[str, Any], key: str) -> float:
    return float(run["summary"]["evaluation"]["scores"][key])


def _cell(cells: list[dict[str, Any]], operator: str, rank: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["operator"] == operator and c["paper_rank"] == rank), None)


def write_markdown(path: Path, chosen: dict[str, list], cells: list[dict], profile: str, key: str) -> None:
    ours = {rank: (_cell(cells, "rope", rank) or {}).get("r", "?") for rank in PAPER_RANKS}
    lines = [
        f"# Table 4: MoRA's compression and decompression operators — profile `{profile}`",
        "",
        "Paper (LLaMA-2-7B, MetaMath -> GSM8K accuracy) beside ours (`" + key + "` at the last evaluation, mean ±",
        "std over seeds, at the learning rate of each cell's grid with the best mean; ↑ / ↓: at the top / bottom of",
        "its grid). Built by `mora.reporting.table4` from the run folders copied to `runs/`.",
        *(
            ["On the tiny profile the task is UUID memorization (README, Table 4), not GSM8K.", ""]
            if profile == "tiny"
            else [""]
        ),
        "| Operator | f_comp, f_decomp | "
        + " | ".join(f"paper r = {r}" for r in PAPER_RANKS)
        + " | "
        + " | ".join(f"ours r = {ours[r]} (paper {r}) | LR | seeds" for r in PAPER_RANKS)
        + " |",
        "|---" * (2 + len(PAPER_RANKS) + 3 * len(PAPER_RANKS)) + "|",
    ]
    for operator, row, equation in OPERATORS:
        cols = [row, equation, *(f"{v:g}" for v in PAPER_TABLE4[operator])]
        for rank in PAPER_RANKS:
            cell = _cell(cells, operator, rank)
            group = chosen.get(cell["name"], []) if cell else []
            lr = group[0]["summary"]["lr"] if group else None
            cols += [
                mean_std([score(r, key) for r in group]),
                lr_cell(lr, cell["lrs"] if cell else []),
                str(len(group)),
            ]
        lines.append("| " + " | ".join(cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, chosen: dict[str, list], cells: list[dict], key: str) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for operator, values in PAPER_TABLE4.items():
            for rank, value in zip(PAPER_RANKS, values, strict=True):
                writer.writerow(["paper", operator, rank, "gsm8k", value, "", rank])
        for cell in cells:
            for run in sorted(chosen.get(cell["name"], []), key=lambda r: r["summary"]["seed"]):
                s = run["summary"]
                writer.writerow(
                    ["ours", cell["operator"], cell["paper_rank"], key, round(score(run, key), 2), s["seed"], s["rank"]]
                )


def write_results(root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str]) -> list[Path]:
    """Collect the finished runs under root with the records kept under out/runs/<profile>, write table4.md and
    table4.csv, and keep the new runs' records there (the base model's too)."""
    key = metric(tasks)
    records = kept(out, profile, root)
    everything = gather(root, records)
    runs = [r for r in everything if r["dir"].name != "base"]
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table4 PROFILE={profile}` first")
    chosen = best_points(runs, cells, lambda run: score(run, key))
    out.mkdir(parents=True, exist_ok=True)
    keep_records(everything, records)
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths = [out / f"table4{suffix}.md", out / f"table4{suffix}.csv"]
    write_markdown(paths[0], chosen, cells, profile, key)
    write_csv(paths[1], chosen, cells, key)
    return paths
