"""The methods comparison from run folders (configs/experiment/methods.yaml): methods.md (best learning rate per
method and budget, mean ± std over seeds), methods.csv (every run, every evaluated step) and methods.png (accuracy
against trainable parameters and against training time: the Pareto view).

Every figure is read from a finished run's summary.json: accuracy and exact match at each evaluation (UUID), the
trainable parameters, the adapter's files on disk, the training time without evaluations, tokens/s, the run's peak
memory (RSS; CUDA's allocated memory on a GPU), the merge check (train.merge_check: merge_adapter's time, whether
merged logits equal unmerged ones) and forgetting: where the base model's cells probe what it was trained on
(`base.<profile>.forgetting`), each probe's score at a run's evaluation minus the base's own, read from the base
run's summary (kept beside the table). Nothing is typed by hand.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import statistics
from pathlib import Path
from typing import Any

from mora.reporting.common import METHOD_NAMES, best_points, gather, keep_records, kept, lr_cell, mean_std

BUDGETS = ("r8", "r256")  # the paper's two LoRA budgets, the suffix of a cell's name
# the probes of forgetting (configs/task/uuid_text.yaml's parts): the base's own pairs, by character accuracy and by
# the values' loss (which still moves where accuracy sits at its floor), and held-out text, by perplexity; a column
# each, the change from the base's score, with the digits it is shown to
PROBES = {"pairs/char_acc": 1, "pairs/loss": 2, "text/ppl": 1}
CSV_COLUMNS = (
    "cell", "method", "budget_r", "lr", "seed", "step", "char_acc", "exact",
    *(f"probe_{p.replace('/', '_')}" for p in PROBES), *(f"delta_{p.replace('/', '_')}" for p in PROBES),
    "trainable_params", "adapter_file_bytes", "train_s", "tokens_per_s", "peak_rss_mb", "peak_cuda_mb", "merge_s",
    "merge_equal",
)  # fmt: skip
RUN_COLUMNS = CSV_COLUMNS[8 + 2 * len(PROBES) :]  # a run's own figures, the same on each of its lines


def label(summary: dict[str, Any]) -> str:
    """The method's name, with MoRA's operator."""
    name = METHOD_NAMES.get(summary["method"], summary["method"])
    return f"{name} ({summary['compression']})" if summary["method"] == "mora" else name


def budget(cell: str) -> str:
    """The paper's budget a cell belongs to (r8, r256), or "" (FFT)."""
    return next((b for b in BUDGETS if f"-{b}" in cell), "")


def evals(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's evaluations after training began (an evaluation at step 0 scores the model it starts from)."""
    return [e for e in run["summary"]["evals"] if "eval/char_acc" in e and e["step"] > 0]


def mean_acc(run: dict[str, Any]) -> float:
    """A run's score for choosing its learning rate: its mean accuracy over the evaluated steps (as Table 2)."""
    return statistics.mean(e["eval/char_acc"] for e in evals(run))


TUNING_SCORE = (mean_acc, False)  # what picks a cell's learning rate (higher is better), here and in --at-best-of


def final(run: dict[str, Any], key: str) -> float:
    return float(evals(run)[-1][key])


def in_grid(run: dict[str, Any], cells: list[dict[str, Any]]) -> bool:
    """The base run, or a run at a learning rate of its cell's grid."""
    if run["dir"].name == "base":
        return True
    names = sorted((c["name"] for c in cells), key=len, reverse=True)
    name = next((n for n in names if run["dir"].name.startswith(n + "-lr")), None)
    if name is None:
        return False
    lrs = next(c["lrs"] for c in cells if c["name"] == name)
    lrs = [lr for grid in lrs.values() for lr in grid] if isinstance(lrs, dict) else lrs
    return any(math.isclose(run["summary"]["lr"], lr, rel_tol=1e-9) for lr in lrs)


def base_scores(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The base model's score on each probe (its run's last evaluation), {} without a base or probes."""
    base = next((run for run in runs if run["dir"].name == "base"), None)
    if base is None or not base["summary"]["evals"]:
        return {}
    last = base["summary"]["evals"][-1]
    return {probe: float(last[f"eval/{probe}"]) for probe in PROBES if f"eval/{probe}" in last}


def start_scores(run: dict[str, Any], base: dict[str, float]) -> dict[str, float]:
    """The probes' scores a run's forgetting is measured from: the base run's, or, where no run of the table trained
    the model the cells start from (the paper profile: a pretrained LLaMA), the run's own evaluation at step 0."""
    if base:
        return base
    first = next((e for e in run["summary"]["evals"] if e["step"] == 0), {})
    return {probe: float(first[f"eval/{probe}"]) for probe in PROBES if f"eval/{probe}" in first}


def forgetting(record: dict[str, Any], base: dict[str, float]) -> dict[str, float]:
    """Per probe: an evaluation's score minus the base's (a record of summary["evals"]; negative accuracy, higher
    perplexity: forgotten)."""
    return {probe: float(record[f"eval/{probe}"]) - base[probe] for probe in base if f"eval/{probe}" in record}


def _mean(group: list[dict[str, Any]], key: str, digits: int = 1, scale: float = 1.0) -> str:
    values = [run["summary"][key] * scale for run in group if run["summary"].get(key) is not None]
    return f"{statistics.mean(values):,.{digits}f}" if values else "–"


def _merge(group: list[dict[str, Any]]) -> str:
    checks = [run["summary"]["merge_equal"] for run in group if "merge_equal" in run["summary"]]
    if not checks:
        return "–"
    return "yes" if all(checks) else f"no ({checks.count(False)} of {len(checks)})"


def _delta(group: list[dict[str, Any]], base: dict[str, float], probe: str, digits: int) -> str:
    values = [forgetting(evals(run)[-1], start_scores(run, base)).get(probe) for run in group]
    values = [v for v in values if v is not None]
    return mean_std(values, digits) if len(values) == len(group) else "–"


def row(cell: dict[str, Any], group: list[dict[str, Any]], base: dict[str, float]) -> list[str]:
    """A cell's columns of methods.md: its best learning rate's runs, over seeds."""
    s = group[0]["summary"]
    peak = "peak_cuda_mb" if "peak_cuda_mb" in s else "peak_rss_mb"
    return [
        label(s),
        cell["name"],
        str(s["rank"] or "-"),
        mean_std([final(run, "eval/char_acc") for run in group]),
        mean_std([final(run, "eval/exact") for run in group]),
        *(_delta(group, base, probe, digits) for probe, digits in PROBES.items()),
        lr_cell(s["lr"], cell["lrs"]),
        str(len(group)),
        f"{s['trainable_params']:,}",
        _mean(group, "adapter_file_bytes", scale=1 / 1024),
        _mean(group, "train_s"),
        _mean(group, "tokens_per_s", 0),
        _mean(group, peak, 0),
        _mean(group, "merge_s", scale=1e3),
        _merge(group),
    ]


HEADER = ("Method", "cell", "r", "accuracy", "exact", "Δ base pairs", "Δ pairs loss", "Δ text ppl", "LR", "seeds",
          "trainable", "file KB", "train s", "tokens/s", "peak MB", "merge ms", "merged = unmerged")  # fmt: skip


def base_line(base: dict[str, float], runs: list[dict[str, Any]]) -> str:
    if not base:
        before = [start_scores(run, base) for run in runs]
        if not any(before):
            return "No base model probed: the Δ columns are empty."
        probes = sorted({probe for scores in before for probe in scores})
        spans = {p: sorted({round(b[p], 2) for b in before if p in b}) for p in probes}
        ranges = ", ".join(f"{p} {v[0]:.2f}" + (f"–{v[-1]:.2f}" if len(v) > 1 else "") for p, v in spans.items())
        return (
            "Forgetting: each run scores the probes at step 0, before training (the pretrained model; here "
            f"{ranges} over the runs), and at each evaluation; the Δ columns are its last evaluation's scores minus "
            "its own at step 0: a rise in perplexity is forgotten."
        )
    scores = ", ".join(f"{probe} {value:.2f}" for probe, value in base.items())
    return (
        f"Forgetting: before any cell trains, the base model scores {scores} on the probes of what it was trained "
        "on (its own pairs: character accuracy, %, and the values' loss, nats per token; held-out text: "
        "perplexity). Δ base pairs (points), Δ pairs loss and Δ text ppl are a cell's scores at its last evaluation "
        "minus the base's: a drop in accuracy, a rise in loss or perplexity is forgotten."
    )


def write_markdown(
    path: Path, chosen: dict[str, list[dict[str, Any]]], cells: list[dict], profile: str, base: dict[str, float]
) -> None:
    experiment = next((g[0]["config"]["run"]["experiment"] for g in chosen.values()), "methods")
    lines = [
        f"# MoRA and the high-rank methods PEFT ships: UUID memorization — `{experiment}`, profile `{profile}`",
        "",
        f"Table 2's UUID setup (its pairs, steps and base: configs/experiment/{experiment}.yaml). Per cell, the",
        "learning rate of its grid with the best mean accuracy over the evaluated steps (↑ / ↓: at the top / bottom",
        "of its grid), by the mean over seeds, or by the first seed's where the grid ran on it alone (`table.tune`);",
        "mean ± std over seeds;",
        "cells -r8 / -r256 match LoRA's trainable parameters at the paper's two budgets (results/methods/budgets.md).",
        "Accuracy: character-level (%) at the last evaluation; exact: pairs recalled whole (%). Train s: the training",
        "loop without evaluations. Peak MB: the run's peak RSS (CUDA: allocated). Merge: PEFT's merge_adapter, and",
        "whether the merged model's logits equal the unmerged one's. Built by `mora.reporting.methods`.",
        "",
        base_line(base, [run for group in chosen.values() for run in group]),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---" * len(HEADER) + "|",
    ]
    for cell in cells:
        group = chosen.get(cell["name"])
        columns = row(cell, group, base) if group else [cell["name"], cell["name"]] + ["–"] * (len(HEADER) - 2)
        lines.append("| " + " | ".join(columns) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, runs: list[dict[str, Any]], cells: list[dict[str, Any]], base: dict[str, float]) -> None:
    """Every run of every cell (each learning rate and seed), one line per evaluated step."""
    names = sorted((c["name"] for c in cells), key=len, reverse=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            cell = next((n for n in names if run["dir"].name.startswith(n + "-lr")), None)
            if cell is None:
                continue
            s = run["summary"]
            for e in evals(run):
                deltas = forgetting(e, start_scores(run, base))
                writer.writerow(
                    [cell, label(s), s["rank"] if s["rank"] is not None else "-", s["lr"], s["seed"], e["step"],
                     round(e["eval/char_acc"], 2), round(e["eval/exact"], 2)]
                    + [round(e[f"eval/{p}"], 4) if f"eval/{p}" in e else "" for p in PROBES]
                    + [round(deltas[p], 4) if p in deltas else "" for p in PROBES]
                    + [s.get(k, "") for k in RUN_COLUMNS]
                )  # fmt: skip


def plot(path: Path, chosen: dict[str, list[dict[str, Any]]], profile: str, base: dict[str, float]) -> None:
    """Final accuracy (mean ± std over seeds, best LR) against trainable parameters, against training time and,
    where the base was probed, against what the cell forgot of the base's pairs (the rise of their loss: accuracy
    sits at its floor for most); one marker and colour per method,
    filled at the high budget: the methods up and to the left do more with less."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = {probe for group in chosen.values() for run in group for probe in start_scores(run, base)}
    forgot = next((p for p in ("pairs/loss", "text/ppl") if p in probed), None)  # the third panel's probe, if any
    panels = 3 if forgot else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    methods = sorted({label(group[0]["summary"]) for group in chosen.values()})
    markers = dict(zip(methods, "osD^v<>phX*P8H", strict=False))
    # tab20's dark shades first, then the light ones: neighbours never share a hue (distinct for up to 20 methods)
    colours = {m: plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20) for i, m in enumerate(methods)}
    for cell, group in chosen.items():
        s = group[0]["summary"]
        accs = [final(run, "eval/char_acc") for run in group]
        mean, spread = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = label(s)
        xs = [s["trainable_params"], statistics.mean(r["summary"]["train_s"] for r in group)]
        if forgot:
            deltas = [forgetting(evals(run)[-1], start_scores(run, base)).get(forgot) for run in group]
            xs.append(statistics.mean(deltas) if None not in deltas else float("nan"))
        for ax, x in zip(axes, xs, strict=True):
            ax.errorbar(
                x, mean, yerr=spread, marker=markers[name], color=colours[name],
                markerfacecolor=colours[name] if budget(cell) != "r8" else "white", linestyle="none",
                label=f"{name} {budget(cell)}".strip(),
            )  # fmt: skip
    axes[0].set(xscale="log", xlabel="trainable parameters", ylabel="character accuracy (%), last evaluation")
    axes[1].set(xlabel="training time (s, without evaluations)", ylabel="character accuracy (%)")
    axes[0].set_title(f"accuracy per parameter ({profile}); open: the low budget (r8)")
    axes[1].set_title("accuracy per second")
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    if forgot:
        what = {"pairs/loss": "Δ loss of the base's own pairs (nats per token)", "text/ppl": "Δ held-out text ppl"}
        axes[2].set(xlabel=what[forgot], ylabel="character accuracy (%)")
        axes[2].set_title("accuracy against forgetting (left: less forgotten)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    root: Path, out: Path, profile: str, cells: list[dict[str, Any]], tasks: list[str] | None = None
) -> list[Path]:
    """Collect the runs under root with the records kept under out/runs/<profile>, write methods.md, methods.csv
    and methods.png (where matplotlib is installed), and keep the new runs' records there."""
    records = kept(out, profile, root)
    runs = gather(root, records)
    if not runs:
        raise ValueError(f"no finished runs under {root}: run `make reproduce-methods PROFILE={profile}` first")
    runs = [run for run in runs if in_grid(run, cells)]  # a grid moved since: its old points are not reported
    chosen = best_points([run for run in runs if evals(run)], cells, *TUNING_SCORE, tuned=True)
    base = base_scores(runs)
    out.mkdir(parents=True, exist_ok=True)
    keep_records(runs, records)
    suffix = "" if profile == "tiny" else f"_{profile}"
    paths = [out / f"methods{suffix}.md", out / f"methods{suffix}.csv", out / f"methods{suffix}.png"]
    write_markdown(paths[0], chosen, cells, profile, base)
    write_csv(paths[1], runs, cells, base)
    if importlib.util.find_spec("matplotlib") is None:
        return paths[:2]
    plot(paths[2], chosen, profile, base)
    return paths
