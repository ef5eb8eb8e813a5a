"""Table 3's regime sweep from run folders: regime.md, regime.csv, regime.png and loss.png in results/table3/regime/.

Each cell of configs/experiment/table3_regime.yaml names its method (`label`), where it lies on the sweep's axes
(`point`: a width and a number of steps) and, for an ablation, its `variant`. Per cell, the learning rate with the
lowest mean final validation perplexity over seeds is chosen (as Table 3 picks), or, where the grid ran on the first
seed alone and the others at its best (`--at-best-of 0`), the first seed's best. At every point (and variant) the
MoRA-family rows are set against their LoRA counterpart as a perplexity ratio (MoRA / LoRA: below 1, MoRA is
ahead), per seed where both cells have it, mean ± std over seeds; an ablation with no LoRA cell of its own is set
against its point's LoRA. The ratios are plotted against tokens per parameter (the length axis) and against width
(the width axis), with the paper's two models marked: their tokens per parameter and widths are computed from
configs/model/llama_250m.yaml and llama_1b.yaml and Table 3's 10k x 1024 x 512 tokens; their ratios from PAPER.md
Table 3 (mora.reporting.table3.PAPER_TABLE3).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

import yaml

from mora.paths import CONFIG_DIR
from mora.reporting.common import best_points, gather, keep_records, kept, lr_cell, mean_std
from mora.reporting.table3 import PAPER_MODELS, PAPER_TABLE3, final_ppl

PAIRS = {"MoRA": "LoRA", "MoRA rope": "LoRA", "ReMoRA": "ReLoRA"}  # a MoRA-family row -> the row it is read against
COLOURS = {"LoRA": "C0", "MoRA": "C1", "MoRA rope": "C4", "ReLoRA": "C2", "ReMoRA": "C3"}
PAPER_TOKENS = 10_000 * 1024 * 512  # Table 3's training tokens (PAPER.md §2.5)
PAPER_CONFIGS = {"250M": "llama_250m", "1.3B": "llama_1b"}
TUNING_SCORE = (final_ppl, True)  # what picks a cell's learning rate (lower is better), here and in --at-best-of
CSV_COLUMNS = ("point", "variant", "width", "steps", "tokens", "tokens_per_param", "epochs", "method", "lr", "seed")
CSV_COLUMNS += ("ppl", "ratio")


def model_parameters(config: dict[str, Any]) -> int:
    """A LLaMA's parameters from its config (no biases; head tied or not): embeddings, head, layers, norms."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    vocab = config["vocab_size"]
    attention = 2 * h * h + 2 * h * (h // heads * kv)
    per_layer = attention + 3 * h * i + 2 * h
    head = 0 if config.get("tie_word_embeddings") else vocab * h
    return vocab * h + head + layers * per_layer + h


def paper_points() -> dict[str, dict[str, float]]:
    """The paper's two models: width, tokens per parameter and both ratios."""
    out = {}
    for model, name in PAPER_CONFIGS.items():
        k = PAPER_MODELS.index(model)
        config = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())["config"]
        out[model] = {
            "width": config["hidden_size"],
            "tokens_per_param": PAPER_TOKENS / model_parameters(config),
            **{row: PAPER_TABLE3[row][k] / PAPER_TABLE3[base][k] for row, base in PAIRS.items() if row in PAPER_TABLE3},
        }
    return out


def describe(run: dict[str, Any]) -> dict[str, Any]:
    """Where a run lies: width, steps, tokens trained, tokens per parameter of its model, epochs of its corpus."""
    config, summary = run["config"], run["summary"]
    # a model built from config gets the tokenizer's vocabulary: the BPE's task.vocab_size where one is trained
    vocab = config["task"].get("vocab_size") or config["model"]["config"]["vocab_size"]
    tokens = summary["steps"] * summary["global_batch"] * config["task"]["block_size"]
    return {
        "width": config["model"]["config"]["hidden_size"],
        "steps": summary["steps"],
        "tokens": tokens,
        "tokens_per_param": tokens / model_parameters({**config["model"]["config"], "vocab_size": vocab}),
        "epochs": summary["steps"] * summary["global_batch"] / summary["examples"],
    }


def rows_of(chosen: dict[str, list], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per chosen cell: its point, variant, method, LR, per-seed perplexities and its ratio to its pair."""
    by_key = {(c["point"], c.get("variant"), c["label"]): c for c in cells}
    rows = []
    for cell in cells:
        group = chosen.get(cell["name"])
        if not group:
            continue
        ppl = {r["summary"]["seed"]: final_ppl(r) for r in group}
        row = {"cell": cell, "runs": group, "ppl": ppl, "ratio": {}, "against": None}
        base = PAIRS.get(cell["label"])
        pair = by_key.get((cell["point"], cell.get("variant"), base)) or by_key.get((cell["point"], None, base))
        if pair is not None and chosen.get(pair["name"]):
            theirs = {r["summary"]["seed"]: final_ppl(r) for r in chosen[pair["name"]]}
            row["ratio"] = {s: ppl[s] / theirs[s] for s in sorted(ppl) if s in theirs}
            row["against"] = pair["name"]
        rows.append(row)
    return rows


def write_markdown(path: Path, rows: list[dict[str, Any]], profile: str) -> None:
    paper = paper_points()
    lines = [
        f"# Table 3's regime: MoRA against LoRA in pretraining from scratch — profile `{profile}`",
        "",
        "Validation perplexity of the last evaluation (package_docs, 400 held-out blocks), mean ± std over seeds, at",
        "the learning rate of each cell's grid with the lowest mean (↑ / ↓: at the top / bottom of its grid). Ratio:",
        "the row's perplexity over its LoRA counterpart's (MoRA and MoRA rope over LoRA, ReMoRA over ReLoRA; an",
        "ablation over its own LoRA where it has one), per seed, mean ± std; below 1 the MoRA row is ahead. Built",
        "by `mora.reporting.table3_regime` from the run folders copied to `runs/`.",
        "",
        "The paper (PAPER.md Table 3): "
        + "; ".join(
            f"{m} (width {p['width']}, {p['tokens_per_param']:.1f} tokens per parameter): MoRA / LoRA "
            f"{p['MoRA']:.3f}, ReMoRA / ReLoRA {p['ReMoRA']:.3f}"
            for m, p in paper.items()
        )
        + ".",
        "",
        "| point | variant | width | steps | tokens / param | epochs | method | ppl | LR | seeds | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cell, where = row["cell"], describe(row["runs"][0])
        per_token = f"{where['tokens_per_param']:.1f}"
        ratio = mean_std(list(row["ratio"].values()), 3) if row["ratio"] else ""
        lines.append(
            f"| {cell['point']} | {cell.get('variant') or ''} | {where['width']} | {where['steps']} | {per_token} | "
            f"{where['epochs']:.2f} | {cell['label']} | {mean_std(list(row['ppl'].values()), 2)} | "
            f"{lr_cell(row['runs'][0]['summary']['lr'], cell['lrs'])} | {len(row['ppl'])} | {ratio} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            cell, where = row["cell"], describe(row["runs"][0])
            for seed, ppl in sorted(row["ppl"].items()):
                ratio = row["ratio"].get(seed)
                writer.writerow(
                    [
                        cell["point"], cell.get("variant") or "", where["width"], where["steps"], where["tokens"],
                        round(where["tokens_per_param"], 3),
                        round(where["epochs"], 3), cell["label"], row["runs"][0]["summary"]["lr"], seed,
                        round(ppl, 3), round(ratio, 4) if ratio is not None else "",
                    ]
                )  # fmt: skip


def _axis(rows: list[dict[str, Any]], fixed: str, moving: str) -> dict[str, list[tuple]]:
    """Per MoRA-family label, (x, mean ratio, std) along one axis: the sweep's own cells (no variant) that share
    the most common value of `fixed` (width for the length axis, steps for the width axis)."""
    own = [r for r in rows if not r["cell"].get("variant") and r["ratio"]]
    if not own:
        return {}
    values = [describe(r["runs"][0])[fixed] for r in own]
    common = max(set(values), key=values.count)
    series: dict[str, list[tuple]] = {}
    for row in own:
        where = describe(row["runs"][0])
        if where[fixed] != common:
            continue
        ratios = list(row["ratio"].values())
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        series.setdefault(row["cell"]["label"], []).append((where[moving], statistics.mean(ratios), spread))
    return {label: sorted(points) for label, points in series.items() if len({p[0] for p in points}) > 1}


def plot_ratios(path: Path, rows: list[dict[str, Any]], profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper_points()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("width", "tokens_per_param", "tokens per parameter"), ("steps", "width", "width (hidden size)"))
    for ax, (fixed, moving, xlabel) in zip(axes, panels, strict=True):
        for label, points in _axis(rows, fixed, moving).items():
            xs, means, spreads = zip(*points, strict=True)
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, color=COLOURS.get(label),
                        label=f"{label} / {PAIRS[label]} (ours)")  # fmt: skip
        for k, (model, p) in enumerate(paper.items()):
            for label in ("MoRA", "ReMoRA"):
                ax.scatter([p[moving]], [p[label]], marker="*", s=160, color=COLOURS[label], edgecolor="black",
                           label=f"{label} / {PAIRS[label]}, paper" if k == 0 else None)  # fmt: skip
            ax.annotate(f"paper {model}", (p[moving], p["MoRA"]), textcoords="offset points", xytext=(6, -12))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2 if moving == "width" else 10)
        ax.set(xlabel=xlabel, ylabel="validation perplexity ratio (below 1: MoRA ahead)",
               title=f"along {xlabel.split(' (')[0]} ({profile} profile)")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_longest(path: Path, rows: list[dict[str, Any]]) -> None:
    """The training loss of the longest point's cells (mean over seeds at the chosen LR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = [r for r in rows if not r["cell"].get("variant")]
    longest = max((describe(r["runs"][0])["steps"] for r in own), default=None)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in (r for r in own if describe(r["runs"][0])["steps"] == longest):
        curves = [{m["step"]: m["train/loss"] for m in run["metrics"] if "tokens" in m} for run in row["runs"]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        label = row["cell"]["label"]
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], color=COLOURS.get(label),
                label=f"{label} ({row['cell']['point']}, LR {row['runs'][0]['summary']['lr']:g})")  # fmt: skip
    ax.set(xlabel="step", ylabel="training loss", title="the longest runs of the sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str]) -> list[Path]:
    """Collect the finished runs under root with the records kept under out/runs/<profile>/, write the table, the
    CSV and both figures, and keep the new runs' records there."""
    records = kept(out, profile, root)
    runs = gather(root, records)
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-table3-regime` first")
    chosen = best_points(runs, cells, *TUNING_SCORE, tuned=True)
    out.mkdir(parents=True, exist_ok=True)
    keep_records(runs, records)
    rows = rows_of(chosen, cells)
    paths = [out / "regime.md", out / "regime.csv", out / "regime.png", out / "loss.png"]
    write_markdown(paths[0], rows, profile)
    write_csv(paths[1], rows)
    plot_ratios(paths[2], rows, profile)
    plot_longest(paths[3], rows)
    return paths
