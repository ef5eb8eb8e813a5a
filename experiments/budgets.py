"""The budget table of the methods comparison (configs/experiment/methods.yaml, and its regime point
methods_regime_w128.yaml): for every cell of each profile, the method's budget knob, its trainable parameters beside
LoRA's at the same budget r, and the bytes its adapter saves, each counted by building the adapter
(mora.inspect.footprint: the meta device; one and two decoder layers, extended to all) -> results/methods/budgets.md
and budgets.csv. A cell whose method cannot come within 10% of LoRA's count says why in its `off_budget`.

    python experiments/budgets.py                       # make budgets
    python experiments/budgets.py --profiles tiny --out /tmp/budgets
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mora.cli import OneLineParser
from mora.paths import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # run as a script: experiments.reproduce, as when imported
    sys.path.insert(0, str(REPO_ROOT))

from experiments.reproduce import compose_cfg, experiment, runs  # noqa: E402
from mora.adapters.build import method_name  # noqa: E402
from mora.inspect import footprint, lora_at  # noqa: E402

TABLE = "methods"
PROFILES = ("tiny", "gpu", "paper")
EXPERIMENTS = {TABLE: PROFILES, "methods_regime_w128": ("tiny",)}  # each experiment's profiles in the table
TOLERANCE = 0.10  # a cell's trainable parameters within 10% of LoRA's at its budget


@dataclass(frozen=True)
class Row:
    experiment: str
    profile: str
    model: str
    cell: str
    method: str
    budget_r: int
    knob: str
    trainable: int
    lora_trainable: int
    ratio: float
    saved_bytes: int
    lora_saved_bytes: int
    counted_on: str
    off_budget: str  # why the method cannot come within 10% of LoRA's count ("": it does)


CSV_COLUMNS = tuple(f.name for f in fields(Row))


def knob(adapter: dict[str, Any]) -> str:
    """The settings that set a method's size: its args (method peft), MoRA's operator, LoRA's rank (pattern)."""
    if adapter.get("args"):
        return ", ".join(f"{k}={_short(v)}" for k, v in adapter["args"].items() if not k.endswith("dropout"))
    parts = [f"r={adapter['r']}"]
    if adapter.get("compression"):
        parts.append(adapter["compression"])
    if adapter.get("rank_pattern"):
        parts.append(f"rank_pattern={_short(adapter['rank_pattern'])}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def rows(profile: str, cells: list[str] | None = None, table: str = TABLE) -> list[Row]:
    """One row per cell of the experiment's grid for the profile that has a budget (every cell but FFT)."""
    spec = experiment(table, profile)
    todo, _ = runs(table, profile, [0], spec["table"]["tasks"], Path("/nonexistent"), cells, one_point=True)
    reasons = {cell["name"]: cell.get("off_budget", "") for cell in spec["cells"]}
    out, lora = [], {}
    for run in todo:
        cfg = compose_cfg(run.overrides)
        adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
        if adapter["method"] == "fft":
            continue
        own = footprint(cfg.model, adapter)
        reference = lora_at(adapter)
        key = (str(cfg.model.name), reference["r"], tuple(reference["target_modules"]))
        if key not in lora:
            lora[key] = footprint(cfg.model, reference)
        base = lora[key]
        out.append(
            Row(
                table,
                profile,
                str(cfg.model.name),
                run.cell,
                method_name(adapter),
                int(adapter["r"]),
                knob(adapter),
                own.trainable,
                base.trainable,
                round(own.trainable / base.trainable, 4),
                own.saved_bytes,
                base.saved_bytes,
                own.device,
                reasons[run.cell],
            )
        )
    return out


def write_csv(path: Path, table: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(astuple(row) for row in table)


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        types = [str, str, str, str, str, int, str, int, int, float, int, int, str, str]
        return [Row(*(t(v) for t, v in zip(types, line, strict=True))) for line in list(csv.reader(f))[1:]]


def markdown(table: list[Row]) -> str:
    """The table as Markdown, one section per experiment and profile; a ratio marked * is as close as the method
    allows, and the reason follows the section."""
    lines = []
    for experiment_name, profile in dict.fromkeys((row.experiment, row.profile) for row in table):
        group = [row for row in table if (row.experiment, row.profile) == (experiment_name, profile)]
        lines += [
            f"**{group[0].model}** (profile `{profile}`, configs/experiment/{experiment_name}.yaml)",
            "",
            "| cell | method | budget r | knob | trainable | / LoRA's | saved MB | LoRA's MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.cell} | {r.method} | {r.budget_r} | {r.knob} | {r.trainable:,} | "
            f"{r.ratio:.3f}{'*' * bool(r.off_budget)} | {_mb(r.saved_bytes)} | {_mb(r.lora_saved_bytes)} |"
            for r in group
        ]
        lines += [f"\n\\* {r.cell}: {r.off_budget}" for r in group if r.off_budget]
        lines.append("")
    return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 2**20:.{1 if size >= 2**20 else 3}f}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / TABLE)
    args = parser.parse_args(argv)
    table = [
        row
        for name, profiles in EXPERIMENTS.items()
        for profile in profiles
        if profile in args.profiles
        for row in rows(profile, table=name)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "budgets.csv", table)
    (args.out / "budgets.md").write_text(
        "# The budget table: trainable parameters and saved size of every cell, beside LoRA's at its budget\n\n"
        "Made by `make budgets` (experiments/budgets.py) from configs/experiment/methods*.yaml; every adapter "
        "built through PEFT, counted on the meta device with one and two decoder layers and extended to all (SHiRA: "
        "real, uninitialised weights). Saved MB: the tensors `save_pretrained` writes (fp32 adapters).\n\n"
        + markdown(table)
    )
    off = [row for row in table if abs(row.ratio - 1) > TOLERANCE and not row.off_budget]
    print(markdown(table))
    for row in off:
        print(f"outside {TOLERANCE:.0%}: {row.experiment} {row.profile} {row.cell} ({row.ratio:.3f})", file=sys.stderr)
    print(f"wrote {args.out / 'budgets.md'}, {args.out / 'budgets.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
