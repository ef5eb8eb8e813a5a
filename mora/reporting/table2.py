"""Table 2 from run folders: table2.md (paper layout, paper beside ours), table2.csv, and the Figs. 2-3 style plot.

Only summary.json / metrics.jsonl files of finished runs are read; nothing is typed by hand except the paper's
numbers (PAPER.md, Table 2).
"""

from __future__ import annotations

import csv
import importlib.util
import statistics
from pathlib import Path
from typing import Any

from mora.reporting.common import METHOD_NAMES, best_points, gather, keep_records, kept, lr_cell, mean_std

# PAPER.md Table 2: character-level accuracy at steps 300/500/700/900 (LLaMA-2-7B).
PAPER_STEPS = (300, 500, 700, 900)
PAPER_ROWS = {
    "fft": ("FFT", "-", 6_738_415_616, (42.5, 100, 100, 100)),
    "lora-r8": ("LoRA", 8, 19_988_480, (9.9, 10.0, 10.7, 54.2)),
    "mora-r8": ("MoRA", 8, 20_014_592, (10.1, 15.7, 87.4, 100)),
    "lora-r256": ("LoRA", 256, 639_631_360, (9.9, 70.6, 100, 100)),
    "mora-r256": ("MoRA", 256, 639_433_088, (41.6, 100, 100, 100)),
}
COLOURS = {"FFT": "black", "LoRA": "C0", "MoRA (sharing)": "C1", "MoRA (rope)": "C2", "MoRA (decouple)": "C3"}
CSV_COLUMNS = ("source", "method", "rank", "trainable_params", "step", "char_acc", "seed")


def method_label(summary: dict[str, Any]) -> str:
    """FFT, LoRA, or MoRA with its operator (the paper leaves the UUID operator ambiguous, PAPER.md §2.6)."""
    name = METHOD_NAMES[summary["method"]]
    return f"{name} ({summary['compression']})" if summary["method"] == "mora" else name


def acc_by_step(run: dict[str, Any]) -> dict[int, float]:
    return {e["step"]: e["eval/char_acc"] for e in run["summary"]["evals"]}


def select(runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per cell, the runs (all seeds) of the learning rate with the best mean accuracy over the evaluated steps,
    averaged over seeds (the paper picks the best LR of a small grid, PAPER.md §2.6)."""
    return best_points(runs, cells, lambda run: statistics.mean(acc_by_step(run).values()))


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
                for step, acc in sorted(acc_by_step(run).items()):
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


def base_line(base: dict[str, Any], profile: str, cells_data_seed: int | None) -> str:
    """What the cells start from, and how far it learned its own pairs: the first `gpu` sizings' bases stopped at
    the UUID format's level (about 20%), and every cell started from them learned nothing."""
    s, task = base["summary"], base["config"]["task"]
    seeds = f"data_seed {task['data_seed']}" + (
        f"; the cells': {cells_data_seed}" if cells_data_seed not in (None, task["data_seed"]) else ""
    )
    final = s["evals"][-1] if s["evals"] else {}
    learned = (
        f"on its own pairs it reached {final['eval/char_acc']:.1f}% character accuracy ({final['eval/exact']:.1f}% "
        f"exact) at step {final['step']}"
        if "eval/char_acc" in final
        else "it was not evaluated"
    )
    return (
        f"Every cell starts from the base model in `runs/{profile}/base/`: {METHOD_NAMES[s['method']]}, {s['steps']} "
        f"steps of {s['global_batch']} on {task['n_pairs']:,} pairs ({seeds}); {learned}."
    )


def _data_seed(chosen: dict[str, list[dict[str, Any]]]) -> int | None:
    return next((run["config"]["task"]["data_seed"] for group in chosen.values() for run in group), None)


def write_markdown(
    path: Path,
    chosen: dict[str, list[dict[str, Any]]],
    profile: str,
    cells: list[dict],
    base: dict[str, Any] | None = None,
) -> None:
    steps = sorted({step for group in chosen.values() for run in group for step in acc_by_step(run)})
    lines = [
        f"# Table 2: UUID memorization, character-level accuracy (%) — profile `{profile}`",
        "",
        "Paper (LLaMA-2-7B, 10,000 pairs, steps 300 / 500 / 700 / 900) beside ours (mean ± std over seeds at the",
        "learning rate of each cell's grid with the best mean accuracy over the evaluated steps; ↑ / ↓ mark a best LR",
        "at the top / bottom of its grid). Built by `mora.reporting.table2` from the run folders copied to `runs/`;",
        "each holds its config.yaml, env.json, summary.json and metrics.jsonl. A row without paper numbers is ours",
        "alone (e.g. the other MoRA operator at the high rank: the paper does not say which one its UUID runs used).",
        "",
        *([base_line(base, profile, _data_seed(chosen)), ""] if base is not None else []),
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
        ours = [mean_std([acc_by_step(r)[s] for r in group]) for s in steps] if group else ["–"] * len(steps)
        s0 = group[0]["summary"] if group else {}
        method = method_label(s0) if group else cell["name"]
        rank, accs = (paper_row[1], [f"{a:g}" for a in paper_row[3]]) if paper_row else ("", [""] * len(PAPER_STEPS))
        lines.append(
            f"| {method} | {rank} | "
            + " | ".join(accs)
            + f" | {s0.get('rank') or '-'} | "
            + " | ".join(ours)
            + f" | {lr_cell(s0.get('lr'), cell['lrs'])} | {len(group)} | {s0.get('trainable_params', 0):,} |"
        )
    path.write_text("\n".join(lines) + "\n")


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
    """Collect the runs under root with the records kept under out/runs/<profile>, write table2.md, table2.csv and
    table2.png (where matplotlib is installed), and keep the new runs' records there (`tasks` is the generic runner's
    argument; Table 2 has one task)."""
    records = kept(out, profile, root)
    runs = gather(root, records)
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table2 PROFILE={profile}` first")
    chosen = select(runs, cells)
    out.mkdir(parents=True, exist_ok=True)
    keep_records(runs, records)
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths = [out / f"table2{suffix}.md", out / f"table2{suffix}.csv", out / f"table2{suffix}.png"]
    base = next((run for run in runs if run["dir"].name == "base"), None)  # the runner's base-model folder
    write_markdown(paths[0], chosen, profile, cells, base)
    write_csv(paths[1], chosen)
    if importlib.util.find_spec("matplotlib") is None:  # a GPU node's own environment: the tables without the plot
        return paths[:2]
    plot(paths[2], chosen, profile)
    return paths
