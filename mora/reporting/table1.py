"""Tables 1, 6 and 7 from run folders: table1.md (paper layout, the paper's numbers beside ours), table6.md (BioMed.
per task), table7.md (Finance per task), table1.csv and a training-loss plot per task.

Only finished runs' summary.json / metrics.jsonl / config.yaml are read; nothing is typed by hand except the paper's
numbers (PAPER.md Tables 1, 6, 7). Per task and cell, the learning rate and search point with the best mean over
seeds of the task's columns is reported (the paper picks from small grids, PAPER.md Table 5), mean ± std over seeds.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from mora.reporting.common import best_points, gather, keep_records, kept, mean_std

# (column key in our summaries, Table 1 header, the task that trains for it)
COLUMNS = (
    ("mmlu_0", "MMLU 0", "tulu_v2"),
    ("mmlu_5", "MMLU 5", "tulu_v2"),
    ("gsm8k", "GSM8K", "metamath"),
    ("math", "MATH", "metamath"),
    ("biomed", "BioMed.", "biomed"),
    ("finance", "Finance", "finance"),
)
# PAPER.md Table 1: (method, rank) -> scores in COLUMNS order (None: "-" in the paper)
PAPER_TABLE1 = {
    ("FFT", None): (50.6, 51.3, 66.6, 20.1, 56.4, 69.6),
    ("LoRA", 8): (50.2, 51.5, 64.6, 15.1, 52.3, 64.0),
    ("LoRA+", 8): (49.2, 51.1, 64.1, 15.8, 52.2, 64.9),
    ("ReLoRA", 8): (49.3, 50.2, 61.5, 14.5, 46.3, 61.0),
    ("AsyLoRA", 8): (50.3, 52.2, 64.5, 15.0, 52.5, 63.5),
    ("DoRA", 8): (50.2, 51.5, 64.5, 14.6, 52.5, 63.9),
    ("MoRA", 8): (49.7, 51.5, 64.2, 15.4, 53.3, 67.1),
    ("LoRA", 256): (49.7, 50.8, 67.9, 19.9, 54.1, 67.3),
    ("LoRA+", 256): (49.2, 51.3, 68.2, 17.1, 54.2, 66.7),
    ("ReLoRA", 256): (None, None, 64.0, 18.1, 52.9, 57.9),
    ("AsyLoRA", 256): (50.1, 52.0, 66.9, 19.3, 54.1, 66.9),
    ("DoRA", 256): (49.6, 51.1, 67.4, 19.5, 54.2, 66.0),
    ("MoRA", 256): (49.9, 51.4, 67.9, 19.2, 55.4, 68.7),
}
# Tables 6 and 7: (our part key, header) and the paper's rows (the last number is the paper's Avg.)
PARTS = {
    "biomed": (("pubmedqa", "PubMedQA"), ("usmle", "USMLE"), ("biommlu", "BioMMLU"), ("rct", "RCT")),
    "finance": (
        ("convfinqa", "ConvFinQA"),
        ("fiqa_sa", "FiQA SA"),
        ("headline", "Headline"),
        ("ner", "NER"),
        ("fpb", "FPB"),
    ),
}
PAPER_PARTS = {
    "biomed": {
        ("FFT", None): (74.1, 41.2, 47.5, 62.7, 56.4),
        ("LoRA", 8): (73.1, 34.9, 45.3, 54.9, 51.9),
        ("MoRA", 8): (73.3, 34.7, 45.3, 59.9, 53.3),
        ("LoRA", 256): (73.8, 39.7, 46.0, 56.9, 54.1),
        ("MoRA", 256): (74.4, 40.4, 46.1, 60.6, 55.4),
    },
    "finance": {
        ("FFT", None): (44.4, 78.8, 82.3, 68.1, 74.3, 69.6),
        ("LoRA", 8): (44.5, 76.2, 72.4, 61.6, 65.1, 64.0),
        ("MoRA", 8): (45.8, 76.6, 76.3, 68.9, 68.2, 67.1),
        ("LoRA", 256): (41.4, 78.3, 83.0, 66.8, 66.7, 67.3),
        ("MoRA", 256): (47.7, 76.3, 83.4, 68.0, 68.1, 68.7),
    },
}
# rank: the paper's rank of the cell (ours too, so that paper and ours line up); our_rank: the r a run of ours used
CSV_COLUMNS = ("source", "method", "rank", "column", "score", "seed", "our_rank")


def task_columns(task: str) -> list[str]:
    return [key for key, _, t in COLUMNS if t == task]


def select(runs: list[dict[str, Any]], cells: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """Per cell, the runs (all seeds) of the point with the best mean over seeds of the task's columns."""
    return best_points(runs, cells, lambda run: statistics.mean(_scores(run)[c] for c in task_columns(task)))


def _scores(run: dict[str, Any]) -> dict[str, float]:
    return run["summary"]["evaluation"]["scores"]


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _key(cell: dict[str, Any]) -> tuple[str, int | None]:
    return cell["label"], cell.get("paper_rank")


def write_table1(path: Path, chosen: dict[str, dict[str, list]], cells: list[dict], profile: str) -> None:
    header = "| Method | Rank | " + " | ".join(f"{title} paper | ours" for _, title, _ in COLUMNS) + " | our rank |"
    lines = [
        f"# Table 1 — profile `{profile}`",
        "",
        "The paper's numbers (LLaMA-2-7B) beside ours: mean ± std over seeds of each cell's best learning rate /",
        "search point (the best mean over the task's columns). Built by `mora.reporting.table1` from the run folders",
        "copied to `runs/`. On the tiny profile this is a pipeline check, not a reproduction.",
        "",
        header,
        "|---" * (3 + 2 * len(COLUMNS)) + "|",
    ]
    for cell in cells:
        paper = PAPER_TABLE1.get(_key(cell), (None,) * len(COLUMNS))
        row, rank = [], "-"
        for (column, _, task), p in zip(COLUMNS, paper, strict=True):
            group = chosen.get(task, {}).get(cell["name"], [])
            row += [_paper(p), mean_std([_scores(r)[column] for r in group])]
            if group and group[0]["summary"]["rank"] is not None:
                rank = str(group[0]["summary"]["rank"])
        lines.append(f"| {cell['label']} | {cell.get('paper_rank') or '-'} | " + " | ".join(row) + f" | {rank} |")
    path.write_text("\n".join(lines) + "\n")


def write_parts(path: Path, domain: str, chosen: dict[str, list], cells: list[dict], profile: str) -> None:
    parts = PARTS[domain]
    number, title = ("6", "biomedical") if domain == "biomed" else ("7", "financial")
    lines = [
        f"# Table {number}: performance on {title} tasks — profile `{profile}`",
        "",
        "Paper (LLaMA-2-7B) beside ours, per task and their average (the Table 1 column), for the cells of Table 1.",
        "",
        "| Method | r | " + " | ".join(f"{h} paper | ours" for _, h in parts) + " | Avg. paper | ours |",
        "|---" * (2 + 2 * len(parts) + 2) + "|",
    ]
    for cell in cells:
        group = chosen.get(cell["name"], [])
        paper = PAPER_PARTS[domain].get(_key(cell))
        if paper is None and not group:
            continue
        paper = paper or (None,) * (len(parts) + 1)
        row = []
        for (part, _), p in zip(parts, paper, strict=False):
            row += [_paper(p), mean_std([_scores(r)[f"{domain}/{part}"] for r in group])]
        row += [_paper(paper[-1]), mean_std([_scores(r)[domain] for r in group])]
        lines.append(f"| {cell['label']} | {cell.get('paper_rank') or '-'} | " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, chosen: dict[str, dict[str, list]], cells: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for (label, rank), scores in PAPER_TABLE1.items():
            for (_, title, _), score in zip(COLUMNS, scores, strict=True):
                if score is not None:
                    writer.writerow(["paper", label, rank or "-", title, score, "", ""])
        for domain, rows in PAPER_PARTS.items():
            for (label, rank), scores in rows.items():
                for (_, header), score in zip(PARTS[domain], scores, strict=False):
                    writer.writerow(["paper", label, rank or "-", header, score, "", ""])
        for cell in cells:
            for column, title, task in COLUMNS:
                for run in sorted(chosen.get(task, {}).get(cell["name"], []), key=lambda r: r["summary"]["seed"]):
                    s = run["summary"]
                    ours = (s["seed"], s["rank"] if s["rank"] is not None else "-")
                    rank = cell.get("paper_rank") or "-"
                    writer.writerow(["ours", cell["label"], rank, title, round(_scores(run)[column], 2), *ours])
                    for part, header in PARTS.get(column, ()):
                        score = round(_scores(run)[f"{column}/{part}"], 2)
                        writer.writerow(["ours", cell["label"], rank, header, score, *ours])


def plot_losses(path: Path, task: str, chosen: dict[str, list], cells: list[dict], profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(dict.fromkeys(c["label"] for c in cells if c["label"] != "FFT"))  # one colour per method
    for cell in (c for c in cells if c["name"] in chosen):
        group = chosen[cell["name"]]
        curves = [{m["step"]: m["train/loss"] for m in r["metrics"] if "tokens" in m} for r in group]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        style = "--" if cell.get("paper_rank") == 8 else "-"  # one line style per rank
        color = "black" if cell["label"] == "FFT" else f"C{methods.index(cell['label'])}"
        label = cell["label"] + (f" r={cell['paper_rank']}" if cell.get("paper_rank") else "")
        ax.plot(steps, mean, style, color=color, label=label)
    ax.set(xlabel="step", ylabel="training loss", title=f"{task} ({profile}): training loss, mean over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str]) -> list[Path]:
    """Collect the finished runs under root/<task>/ with the records kept under out/runs/<profile>/<task>/, write the
    tables, the CSV and the plots, and keep the new runs' records there (tasks not run yet show "–")."""
    chosen: dict[str, dict[str, list]] = {}
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths: list[Path] = []
    for task in tasks:
        records = kept(out, profile, root) / task
        runs = gather(root / task, records)
        if not runs:
            continue
        chosen[task] = select(runs, cells, task)
        keep_records(runs, records)
        paths.append(out / f"loss_{task}{suffix}.png")
        plot_losses(paths[-1], task, chosen[task], cells, profile)
    if not chosen:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table1 PROFILE={profile}` first")
    tables = [out / f"table1{suffix}.md", out / f"table6{suffix}.md", out / f"table7{suffix}.md"]
    write_table1(tables[0], chosen, cells, profile)
    write_parts(tables[1], "biomed", chosen.get("biomed", {}), cells, profile)
    write_parts(tables[2], "finance", chosen.get("finance", {}), cells, profile)
    write_csv(out / f"table1{suffix}.csv", chosen, cells)
    return [*tables, out / f"table1{suffix}.csv", *paths]
