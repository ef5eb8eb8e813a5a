"""Table 3 (with Figs. 4 and 5) from run folders: table3.md (the paper's perplexities beside ours, and the Fig. 5
counts), table3.csv (source, method, model, ppl, seed), fig4_loss.png (pretraining loss) and fig5_spectrum.png
(singular values of ΔW above 0.1, averaged over layers, per module type).

Only finished runs' summary.json / metrics.jsonl / config.yaml / spectrum.json are read; nothing is typed by hand
except the paper's numbers (PAPER.md Table 3). Per cell, the learning rate with the lowest mean final perplexity
over seeds is reported, mean ± std over seeds.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from mora.reporting.common import best_points, gather, keep_records, kept, lr_cell, mean_std

PAPER_MODELS = ("250M", "1.3B")
PAPER_TABLE3 = {  # PAPER.md Table 3: C4 validation perplexity
    "LoRA": (33.40, 28.56),
    "MoRA": (28.54, 25.25),
    "ReLoRA": (32.19, 27.80),
    "ReMoRA": (26.74, 23.34),
}
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")  # Fig. 5's order
CSV_COLUMNS = ("source", "method", "model", "ppl", "seed")
COLOURS = {"LoRA": "C0", "MoRA": "C1", "ReLoRA": "C2", "ReMoRA": "C3"}


def final_ppl(run: dict[str, Any]) -> float:
    return float(run["summary"]["evaluation"]["scores"]["ppl"])


def _models(cells: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(c["model"]) for c in cells))


def write_markdown(path: Path, chosen: dict[str, list], cells: list[dict[str, Any]], profile: str) -> None:
    models = _models(cells)
    by_label = {(c["label"], str(c["model"])): c for c in cells}
    labels = list(dict.fromkeys(c["label"] for c in cells))
    lines = [
        f"# Table 3: C4 validation perplexity, pretraining from scratch — profile `{profile}`",
        "",
        "Paper (LLaMA 250M / 1.3B, 10k steps x 1024 x 512 tokens, r = 128) beside ours: the perplexity of the last",
        "evaluation, mean ± std over seeds, at the learning rate of each cell's grid with the lowest mean (↑ / ↓: at",
        "the top / bottom of its grid). Built by `mora.reporting.table3` from the run folders copied to `runs/`.",
        *(
            ["On the tiny profile the model, corpus and budget are far from the paper's (README, Table 3).", ""]
            if profile == "tiny"
            else [""]
        ),
        "| Method | "
        + " | ".join(f"paper {m}" for m in PAPER_MODELS)
        + " | "
        + " | ".join(f"ours {m} | LR | seeds | trainable" for m in models)
        + " |",
        "|---" * (1 + len(PAPER_MODELS) + 4 * len(models)) + "|",
    ]
    for label in labels:
        row = [label, *(f"{v:.2f}" for v in PAPER_TABLE3.get(label, ("",) * len(PAPER_MODELS)))]
        for model in models:
            cell = by_label.get((label, model))
            group = chosen.get(cell["name"], []) if cell else []
            s0 = group[0]["summary"] if group else {}
            row += [
                mean_std([final_ppl(r) for r in group], 2),
                lr_cell(s0.get("lr"), cell["lrs"] if cell else []),
                str(len(group)),
                f"{s0['trainable_params']:,}" if group else "–",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Fig. 5: singular values of ΔW above 0.1, mean over layers (ours, mean over seeds)",
        "",
        "ΔW is each adapted weight now minus the same weight at step 0: for ReLoRA / ReMoRA it includes every merge.",
        "",
        "| Model | Method | " + " | ".join(MODULE_TYPES) + " |",
        "|---" * (2 + len(MODULE_TYPES)) + "|",
    ]
    for model in models:
        for label in labels:
            cell = by_label.get((label, model))
            group = [r for r in chosen.get(cell["name"], []) if r["summary"].get("spectrum")] if cell else []
            if group:
                counts = [statistics.mean(r["summary"]["spectrum"][k] for r in group) for k in MODULE_TYPES]
                lines.append(f"| {model} | {label} | " + " | ".join(f"{c:.1f}" for c in counts) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, chosen: dict[str, list], cells: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for label, values in PAPER_TABLE3.items():
            for model, ppl in zip(PAPER_MODELS, values, strict=True):
                writer.writerow(["paper", label, model, ppl, ""])
        for cell in cells:
            for run in sorted(chosen.get(cell["name"], []), key=lambda r: r["summary"]["seed"]):
                writer.writerow(
                    ["ours", cell["label"], cell["model"], round(final_ppl(run), 3), run["summary"]["seed"]]
                )


def _loss_curve(run: dict[str, Any]) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in run["metrics"] if "tokens" in m and "train/loss" in m}


def plot_losses(path: Path, chosen: dict[str, list], cells: list[dict[str, Any]], profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(cells)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for cell in (c for c in cells if str(c["model"]) == model and c["name"] in chosen):
            curves = [_loss_curve(r) for r in chosen[cell["name"]]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[s] for c in curves] for s in steps]
            mean = [statistics.mean(v) for v in values]
            colour = COLOURS.get(cell["label"])
            ax.plot(steps, mean, color=colour, label=cell["label"])
            if len(curves) > 1:
                spread = [statistics.stdev(v) for v in values]
                low = [m - d for m, d in zip(mean, spread, strict=True)]
                high = [m + d for m, d in zip(mean, spread, strict=True)]
                ax.fill_between(steps, low, high, color=colour, alpha=0.15)
        ax.set(
            xlabel="step", ylabel="training loss", title=f"pretraining from scratch: {model} model, {profile} profile"
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(path: Path, chosen: dict[str, list], cells: list[dict[str, Any]], profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(cells)
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        shown = [c for c in cells if str(c["model"]) == model and c["name"] in chosen]
        width = 0.8 / max(1, len(shown))
        for i, cell in enumerate(shown):
            group = [r for r in chosen[cell["name"]] if r["summary"].get("spectrum")]
            if not group:
                continue
            counts = [statistics.mean(r["summary"]["spectrum"][k] for r in group) for k in MODULE_TYPES]
            xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(MODULE_TYPES))]
            ax.bar(xs, counts, width, color=COLOURS.get(cell["label"]), label=cell["label"])
        ax.set_xticks(range(len(MODULE_TYPES)), [f"ΔW{k.removesuffix('_proj')}" for k in MODULE_TYPES])
        ax.set(ylabel="singular values > 0.1 (mean over layers)", title=f"Fig. 5: {model} model, {profile} profile")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str]) -> list[Path]:
    """Collect the finished runs under root with the records kept under out/runs/<profile>/, write the table, the
    CSV and both figures, and keep the new runs' records (with spectrum.json) there."""
    records = kept(out, profile, root)
    runs = gather(root, records)
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table3 PROFILE={profile}` first")
    chosen = best_points(runs, cells, final_ppl, lower_is_better=True)
    out.mkdir(parents=True, exist_ok=True)
    keep_records(runs, records, extra=("spectrum.json",))
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths = [out / f"table3{suffix}.md", out / f"table3{suffix}.csv"]
    paths += [out / f"fig4_loss{suffix}.png", out / f"fig5_spectrum{suffix}.png"]
    write_markdown(paths[0], chosen, cells, profile)
    write_csv(paths[1], chosen, cells)
    plot_losses(paths[2], chosen, cells, profile)
    plot_spectrum(paths[3], chosen, cells, profile)
    return paths
