"""Table 2's regime sweep from run folders: regime.md, regime.csv and regime.png in results/table2/regime/.

Each point of the sweep (configs/experiment/table2_regime_<point>.yaml) is a model width with its own pairs; its
runs lie in runs/<sweep>_<point>/<profile>/. For every point run so far, and for each rank, the LoRA and MoRA
cells at their best learning rate (the mean over seeds of the mean accuracy over the evaluated steps, as Table 2
picks) give the MoRA - LoRA gap, placed against the paper's two ratios: trainable parameters / bits of the values
(128 bits per value: 32 hex digits) and pairs / rank. Only the records of finished runs are read.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from mora.reporting.common import best_points, gather, keep_records, lr_cell, mean_std
from mora.reporting.table2 import PAPER_ROWS, acc_by_step

BITS_PER_VALUE = 128
RANKS = {"low": ("lora-r8", "mora-r8"), "high": ("lora-r256", "mora-r256")}  # the paper's r = 8 and r = 256 cells
CSV_COLUMNS = ("point", "rank_level", "width", "pairs", "rank", "params_per_bit", "pairs_per_rank", "method")
CSV_COLUMNS += ("lr", "seed", "mean_acc", "final_acc")


def mean_acc(run: dict[str, Any]) -> float:
    return statistics.mean(acc_by_step(run).values())


def final_acc(run: dict[str, Any]) -> float:
    accs = acc_by_step(run)
    return accs[max(accs)]


def paper_points() -> dict[str, dict[str, float]]:
    """The paper's two ratios and MoRA - LoRA gap (mean over its four evaluations) at r = 8 and r = 256."""
    out = {}
    for level, (lora, mora) in RANKS.items():
        _, rank, params, lora_accs = PAPER_ROWS[lora]
        mora_accs = PAPER_ROWS[mora][3]
        out[level] = {
            "params_per_bit": params / (10_000 * BITS_PER_VALUE),
            "pairs_per_rank": 10_000 / rank,
            "gap": statistics.mean(mora_accs) - statistics.mean(lora_accs),
        }
    return out


def point_rows(name: str, runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rank level of one point: both cells at their best LR and the gap."""
    chosen = best_points(runs, cells, mean_acc)
    rows = []
    for level, (lora, mora) in RANKS.items():
        if lora not in chosen or mora not in chosen:
            continue
        first = chosen[lora][0]
        pairs, rank = first["config"]["task"]["n_pairs"], first["summary"]["rank"]
        rows.append(
            {
                "point": name,
                "level": level,
                "width": first["config"]["model"]["config"]["hidden_size"],
                "pairs": pairs,
                "rank": rank,
                "params_per_bit": first["summary"]["trainable_params"] / (pairs * BITS_PER_VALUE),
                "pairs_per_rank": pairs / rank,
                "lora": chosen[lora],
                "mora": chosen[mora],
                "gap": statistics.mean(map(mean_acc, chosen[mora])) - statistics.mean(map(mean_acc, chosen[lora])),
                "final_gap": statistics.mean(map(final_acc, chosen[mora]))
                - statistics.mean(map(final_acc, chosen[lora])),
            }
        )
    return rows


def write_markdown(path: Path, rows: list[dict[str, Any]], cells: list[dict[str, Any]]) -> None:
    paper = paper_points()
    grids = {c["name"]: c["lrs"] for c in cells}
    lines = [
        "# Table 2's regime: MoRA - LoRA against the paper's two ratios",
        "",
        "Each point: a 2-layer LLaMA of the given width, its own base (FFT on 256 other pairs), LoRA and MoRA at equal",
        "trainable parameters (`rope` at the low rank, `sharing` at the high), each at the best LR of its grid (the",
        "mean accuracy over steps 75 / 150 / 225 / 300, averaged over seeds). Accuracy: character level (%), mean ±",
        "std over seeds; `gap` = MoRA - LoRA in the mean accuracy over the four evaluations. Ratios: trainable",
        "parameters / bits of the values (128 bits each) and pairs / rank. Built by `mora.reporting.regime` from the",
        "run folders copied to `runs/`.",
        "",
        "| point | rank | width | pairs | r | params / bits | pairs / rank | LoRA (last step) | MoRA (last step) "
        "| LR LoRA / MoRA | seeds | gap (mean) | gap (last step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lora, mora = row["lora"], row["mora"]
        lrs = " / ".join(
            lr_cell(group[0]["summary"]["lr"], grids[name])
            for group, name in zip((lora, mora), RANKS[row["level"]], strict=True)
        )
        lines.append(
            f"| {row['point']} | {row['level']} | {row['width']} | {row['pairs']} | {row['rank']} | "
            f"{row['params_per_bit']:.2f} | {row['pairs_per_rank']:.0f} | {mean_std([final_acc(r) for r in lora])} | "
            f"{mean_std([final_acc(r) for r in mora])} | {lrs} | {min(len(lora), len(mora))} | {row['gap']:+.1f} | "
            f"{row['final_gap']:+.1f} |"
        )
    for level, p in paper.items():
        lines.append(
            f"| paper | {level} | 4096 | 10000 | {8 if level == 'low' else 256} | {p['params_per_bit']:.1f} | "
            f"{p['pairs_per_rank']:.0f} | | | | | {p['gap']:+.1f} | |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            for method in ("lora", "mora"):
                for run in sorted(row[method], key=lambda r: r["summary"]["seed"]):
                    place = [row[k] for k in ("point", "level", "width", "pairs", "rank")]
                    ratios = [round(row["params_per_bit"], 4), round(row["pairs_per_rank"], 2)]
                    s = run["summary"]
                    scores = [round(mean_acc(run), 2), round(final_acc(run), 2)]
                    writer.writerow([*place, *ratios, method, s["lr"], s["seed"], *scores])


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper_points()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "params_per_bit", "trainable parameters / bits of the values"),
        (axes[1], "pairs_per_rank", "pairs / rank"),
    ):
        for level, colour in (("low", "C2"), ("high", "C1")):
            ours = sorted((r[key], r["gap"], r["point"]) for r in rows if r["level"] == level)
            if ours:
                ax.plot([o[0] for o in ours], [o[1] for o in ours], "o-", color=colour, label=f"ours, {level} rank")
                for x, y, name in ours:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            star = {"color": colour, "markersize": 14, "markeredgecolor": "black", "label": f"paper, {level} rank"}
            ax.plot(paper[level][key], paper[level]["gap"], "*", **star)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xscale="log", xlabel=label, ylabel="MoRA − LoRA, mean accuracy (points)")
        ax.legend(fontsize=8)
    fig.suptitle("UUID memorization: MoRA's advantage against the paper's two ratios")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _point(root: Path) -> tuple[str, str]:
    """The sweep and the point of a runner folder: runs/table2_regime_w128/tiny -> (table2_regime, w128)."""
    sweep, name = root.parent.name.rsplit("_", 1)
    return sweep, name


def kept(out: Path, profile: str, root: Path) -> Path:
    """Where the records of one point's runs are kept: out/runs/<point>/ (the sweep's points share out)."""
    return out / "runs" / _point(root)[1]


def write_results(
    root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str] | None = None
) -> list[Path]:
    """Every point of the sweep, its runs under root's parent folder (runs/<sweep>_<point>/<profile>) with the
    records kept under out/runs/<point>/, into out: regime.md, regime.csv, regime.png, and the new runs' records
    kept there (`tasks`: the runner's argument; UUID)."""
    sweep = _point(root)[0]
    ran = {folder.parent.name[len(sweep) + 1 :] for folder in root.parent.parent.glob(f"{sweep}_*/{profile}")}
    names = sorted(ran | {p.name for p in (out / "runs").glob("*") if p.is_dir()})
    rows, points = [], []
    for name in names:
        records = out / "runs" / name
        runs = gather(root.parent.parent / f"{sweep}_{name}" / profile, records)
        rows += point_rows(name, runs, cells)
        points.append((records, runs))
    if not rows:
        raise ValueError(f"no finished pair of LoRA and MoRA runs under {root.parent.parent}/{sweep}_*/{profile}")
    rows.sort(key=lambda r: (r["level"] != "low", r["params_per_bit"]))
    out.mkdir(parents=True, exist_ok=True)
    for records, runs in points:
        keep_records(runs, records)
    paths = [out / "regime.md", out / "regime.csv", out / "regime.png"]
    write_markdown(paths[0], rows, cells)
    write_csv(paths[1], rows)
    plot(paths[2], rows)
    return paths
