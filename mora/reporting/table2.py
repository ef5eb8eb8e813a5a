"""Table 2 from run folders: table2.md (paper layout, paper beside ours), table2.csv, and the Figs. 2-3 style plot.

Only summary.json / metrics.jsonl files of finished runs are read; nothing is typed by hand except the paper's
numbers (PAPER.md, Table 2).
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

# PAPER.md Table 2: character-level accuracy at steps 300/500/700/900 (LLaMA-2-7B).
PAPER_STEPS = (300, 500, 700, 900)
PAPER_ROWS = {
    "fft": ("FFT", "-", 6_738_415_616, (42.5, 100, 100, 100)),
    "lora-r8": ("LoRA", 8, 19_988_480, (9.9, 10.0, 10.7, 54.2)),
    "mora-r8": ("MoRA", 8, 20_014_592, (10.1, 15.7, 87.4, 100)),
    "lora-r256": ("LoRA", 256, 639_631_360, (9.9, 70.6, 100, 100)),
    "mora-r256": ("MoRA", 256, 639_433_088, (41.6, 100, 100, 100)),
}
METHOD_NAMES = {"fft": "FFT", "lora": "LoRA", "mora": "MoRA"}
COLOURS = {"FFT": "black", "LoRA": "C0", "MoRA (sharing)": "C1", "MoRA (rope)": "C2"}  # per method / operator
CSV_COLUMNS = ("source", "method", "rank", "trainable_params", "step", "char_acc", "seed")


def method_label(summary: dict[str, Any]) -> str:
    """FFT, LoRA, or MoRA with its operator (the paper leaves the UUID operator ambiguous, PAPER.md §2.6)."""
    name = METHOD_NAMES[summary["method"]]
    return f"{name} ({summary['compression']})" if summary["method"] == "mora" else name


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


def _cell_of(run: dict[str, Any], cells: list[dict[str, Any]]) -> str | None:
    name = run["dir"].name
    for cell in cells:
        if name.startswith(cell["name"] + "-lr"):
            return cell["name"]
    return None


def _acc_by_step(run: dict[str, Any]) -> dict[int, float]:
    return {e["step"]: e["eval/char_acc"] for e in run["summary"]["evals"]}


def select(runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per cell, the runs (all seeds) of the learning rate with the best mean accuracy over the evaluated steps,
    averaged over seeds (the paper picks the best LR of a small grid, PAPER.md §2.6)."""
    by_cell_lr: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell = _cell_of(run, cells)
        if cell is not None:
            by_cell_lr[cell][run["summary"]["lr"]].append(run)

    def score(group: list[dict[str, Any]]) -> float:
        return statistics.mean(statistics.mean(_acc_by_step(r).values()) for r in group)

    return {cell: max(lrs.values(), key=score) for cell, lrs in by_cell_lr.items()}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_csv(path: Path, chosen: dict[str, list[dict[str, Any]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for method, rank, params, accs in PAPER_ROWS.values():
            for step, acc in zip(PAPER_STEPS, accs, strict=True):
                writer.writerow(["paper", method, rank, params, step, acc, ""])
        for group in chosen.values():
            for run in sorted(group, key=lambda r: r["summary"]["seed"]):
                s = run["summary"]
                for step, acc in sorted(_acc_by_step(run).items()):
                    writer.writerow(
                        [
                            "ours",
                            method_label(s),
                            s["rank"] if s["rank"] is not None else "-",
                            s["trainable_params"],
                            step,
                            round(acc, 2),
                            s["seed"],
                        ]
                    )


def write_markdown(path: Path, chosen: dict[str, list[dict[str, Any]]], profile: str, cells: list[dict]) -> None:
    steps = sorted({step for group in chosen.values() for run in group for step in _acc_by_step(run)})
    lines = [
        f"# Table 2: UUID memorization, character-level accuracy (%) — profile `{profile}`",
        "",
        "Paper (LLaMA-2-7B, 10,000 pairs, steps 300 / 500 / 700 / 900) beside ours (mean ± std over seeds at the",
        "learning rate of each cell's grid with the best mean accuracy over the evaluated steps; ↑ / ↓ mark a best LR",
        "at the top / bottom of its grid). Built by `mora.reporting.table2` from the run folders copied to `runs/`;",
        "each holds its config.yaml, env.json, summary.json and metrics.jsonl. A row without paper numbers is ours",
        "alone (e.g. the other MoRA operator at the high rank: the paper does not say which one its UUID runs used).",
        "",
        *(
            [f"Every cell starts from the base model trained in `runs/{profile}/base/` (see its config.yaml).", ""]
            if any(r["config"]["model"].get("pretrained") for g in chosen.values() for r in g) and profile != "paper"
            else []
        ),
        "| Method | paper rank | paper "
        + " | paper ".join(map(str, PAPER_STEPS))
        + " | our rank | "
        + " | ".join(f"ours {s}" for s in steps)
        + " | LR | seeds | trainable (ours) |",
        "|---" * (3 + len(PAPER_STEPS) + len(steps) + 3) + "|",
    ]
    for cell in cells:
        paper_row = PAPER_ROWS.get(cell.get("paper", cell["name"]))
        group = chosen.get(cell["name"], [])
        ours = [_mean_std([_acc_by_step(r)[s] for r in group]) for s in steps] if group else ["–"] * len(steps)
        s0 = group[0]["summary"] if group else {}
        method = method_label(s0) if group else cell["name"]
        rank, accs = (paper_row[1], [f"{a:g}" for a in paper_row[3]]) if paper_row else ("", [""] * len(PAPER_STEPS))
        lines.append(
            f"| {method} | {rank} | "
            + " | ".join(accs)
            + f" | {s0.get('rank') or '-'} | "
            + " | ".join(ours)
            + f" | {_lr_cell(s0.get('lr'), cell['lrs'])} | {len(group)} | {s0.get('trainable_params', 0):,} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _lr_cell(lr: float | None, grid: list[float]) -> str:
    # the chosen LR, marked where it sits at an edge of a grid of several (the optimum may lie beyond it)
    if lr is None:
        return "–"
    edge = " ↑" if len(grid) > 1 and lr == max(grid) else " ↓" if len(grid) > 1 and lr == min(grid) else ""
    return f"{lr:g}{edge}"


def _curve(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in run["metrics"] if key in m and "event" not in m]
    if key == "train/loss":
        points = [(m["step"], m[key]) for m in run["metrics"] if "tokens" in m]
    steps = sorted({s for s, _ in points})
    values = dict(points)
    return steps, [values[s] for s in steps]


def line_style(cell: str, summary: dict[str, Any]) -> tuple[str, str]:
    """(colour, line style) of a cell's curves and bands: one colour per method / operator, one style per paper
    rank (dashed: the paper's r = 8 cells, solid: r = 256 and FFT)."""
    colour = COLOURS.get(method_label(summary), "C7")
    return colour, "--" if cell.split("-")[1:2] == ["r8"] else "-"


def plot(path: Path, chosen: dict[str, list[dict[str, Any]]], profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for cell, group in chosen.items():
        s = group[0]["summary"]
        label = method_label(s) + (f" r={s['rank']}" if s["rank"] else "")
        colour, style = line_style(cell, s)
        for ax, key in ((ax_acc, "eval/char_acc"), (ax_loss, "train/loss")):
            curves = [_curve(run, key) for run in group]
            steps = curves[0][0]
            values = [[c[1][i] for c in curves if i < len(c[1])] for i in range(len(steps))]
            mean = [statistics.mean(v) for v in values]
            marker = "o" if key == "eval/char_acc" else None
            ax.plot(steps, mean, style, color=colour, label=label, marker=marker)
            if len(group) > 1:
                spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                ax.fill_between(
                    steps,
                    [m - d for m, d in zip(mean, spread, strict=True)],
                    [m + d for m, d in zip(mean, spread, strict=True)],
                    color=colour,
                    alpha=0.15,
                )
    ax_acc.set(xlabel="step", ylabel="character-level accuracy (%)", title=f"UUID memorization ({profile})")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss (value tokens)")
    ax_acc.legend()
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str] | None = None
) -> list[Path]:
    """Collect the runs under root and write table2.md, table2.csv, table2.png and the chosen runs under out/runs
    (`tasks` is the generic runner's argument; Table 2 has one task)."""
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table2 PROFILE={profile}` first")
    chosen = select(runs, cells)
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "runs" / profile
    if kept.exists():
        shutil.rmtree(kept)
    for run in runs:
        target = kept / run["dir"].name
        target.mkdir(parents=True)
        for name in ("config.yaml", "env.json", "summary.json", "metrics.jsonl"):
            shutil.copy(run["dir"] / name, target / name)
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths = [out / f"table2{suffix}.md", out / f"table2{suffix}.csv", out / f"table2{suffix}.png"]
    write_markdown(paths[0], chosen, profile, cells)
    write_csv(paths[1], chosen)
    plot(paths[2], chosen, profile)
    return paths
