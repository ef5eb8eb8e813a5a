"""A dress rehearsal of every GPU profile on this machine, before anyone spends GPU hours on it (make rehearse).

    python experiments/rehearse.py                                   # every run of every table's paper and gpu profile
    python experiments/rehearse.py --profiles paper --tables table3  # one table
    python experiments/rehearse.py --cells mora-r8 lora-r8           # some cells of every table that has them
    python experiments/rehearse.py --quick                           # CI's subset (below)

Each table goes through the one table runner (experiments/reproduce.py --rehearse --keep-going): every run takes
its profile's own code path, the launcher its cell asks for (mora.launch with DDP, DeepSpeed ZeRO-2 or ZeRO-3 on 2
gloo processes; one process for the `gpu` profile), its optimizer, schedule shape, precision, restarts and
evaluation columns, with only the sizes shrunk (experiments/rehearsal.py), and the table's reporter builds the
table from the rehearsed runs (runs/rehearsal/results/, marked; --quick: runs/rehearsal/quick/). Then each
finished run's saved adapter is read back from its folder and evaluated again (mora.training.reload): the scores
must be the run's own. One line per run as it ends, a summary, runs/rehearsal/rehearsal.md; exit 1 when a run
failed or its reloaded adapter scored otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from experiments import reproduce  # noqa: E402
from mora.cli import OneLineParser  # noqa: E402

# every table of a GPU profile: (table, profile)
TABLES = (
    ("table1", "paper"), ("table2", "paper"), ("table3", "paper"), ("table4", "paper"), ("methods", "paper"),
    ("table2", "gpu"), ("table3", "gpu"), ("methods", "gpu"),
)  # fmt: skip
SEEDS = {"paper": "42", "gpu": "0"}  # the make targets' first seed of each profile
# CI's subset, each cell at its first learning rate and search point: every multi-process launcher (DDP, ZeRO-2,
# ZeRO-3), every text recipe (tulu_v2, metamath, cpt, c4), ReLoRA's and ReMoRA's restarts, bf16 autocast and the
# spectrum, and the reporters of Tables 1 and 3. The `gpu` profile's one-process runs (a base model first, UUID,
# Table 2's reporter) are rehearsed by the dry GPU check (tests/test_gpu_profile.py), which runs the same cell
QUICK = (
    ("table1", "paper", ["--tasks", "tulu_v2", "--cells", "relora-r8"]),  # DDP, restarts, MMLU 0 / 5 shots
    ("table1", "paper", ["--tasks", "metamath", "--cells", "mora-r8"]),  # ZeRO-2 in bf16, GSM8K + MATH
    ("table1", "paper", ["--tasks", "biomed", "--cells", "dora-r8", "--launcher", "deepspeed_zero3"]),  # ZeRO-3, cpt
    ("table3", "paper", ["--cells", "remora-250m"]),  # DDP, bf16 autocast, C4 recipe, ReMoRA, spectrum
)


@dataclass
class Rehearsed:
    table: str
    profile: str
    folder: Path
    launcher: str
    processes: int
    seconds: float | None
    status: str
    reload: str


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(table, profile, runner arguments) for each call of the runner."""
    if args.quick:
        return [(t, p, [*extra, "--one-point"]) for t, p, extra in QUICK]
    calls = []
    for table, profile in TABLES:
        if profile not in args.profiles or (args.tables and table not in args.tables):
            continue
        cells = [c["name"] for c in reproduce.experiment(table, profile)["cells"]]
        chosen = [c for c in cells if not args.cells or c in args.cells]
        if chosen:
            calls.append((table, profile, ["--cells", *chosen, *(["--one-point"] if args.one_point else [])]))
    return calls


def home(quick: bool) -> Path:
    """Where a rehearsal's runs and tables go: CI's subset apart (its ZeRO-3 run is a cell of ZeRO-2 otherwise)."""
    return reproduce.REHEARSALS / "quick" if quick else reproduce.REHEARSALS


def folders(table: str, profile: str, extra: list[str], where: Path) -> list[Path]:
    """The run folders one runner call makes under `where` (the base model's first)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--cells", nargs="+")
    parser.add_argument("--launcher")
    parser.add_argument("--one-point", action="store_true")
    a = parser.parse_args(extra)
    spec = reproduce.experiment(table, profile)
    root = where / table / profile
    todo, base = reproduce.runs(
        table, profile, [int(SEEDS[profile])], a.tasks or spec["table"]["tasks"], root, a.cells, [], a.one_point
    )
    return [r.folder for r in ([base] if base else []) + todo]


def check(folder: Path, where: Path) -> Rehearsed:
    """A rehearsed run's record, and its saved adapter reloaded and evaluated (once: kept in reload.json)."""
    from omegaconf import OmegaConf

    from mora.training.reload import evaluate_saved

    table, profile = folder.relative_to(where).parts[:2]
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    cfg = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").exists() else None
    launcher = str(cfg.launcher.name) if cfg else "–"
    processes = summary.get("world_size") or (int(cfg.launcher.num_processes) if cfg else 0)
    status = summary.get("status", "not started")
    reload = "–"
    if status == "finished":
        kept = folder / "reload.json"
        if not kept.exists():
            kept.write_text(json.dumps(evaluate_saved(folder), indent=2))
        result = json.loads(kept.read_text())
        reload = "same scores" if result["agree"] else f"DIFFERENT: run {result['run']}, reloaded {result['reloaded']}"
    return Rehearsed(table, profile, folder, launcher, processes, summary.get("wall_s"), status, reload)


def line(r: Rehearsed) -> str:
    seconds = "–" if r.seconds is None else f"{r.seconds:.0f}"
    name = f"{r.folder.parent.name}/{r.folder.name}" if r.table == "table1" else r.folder.name
    return f"| {r.table} | {r.profile} | {name} | {r.launcher} | {r.processes} | {seconds} | {r.status} | {r.reload} |"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        make_variables={"--profiles": "PROFILE", "--tables": "TABLES", "--cells": "CELLS"},
    )
    parser.add_argument("--profiles", nargs="+", default=["paper", "gpu"], choices=["paper", "gpu"])
    parser.add_argument("--tables", nargs="+", choices=sorted({t for t, _ in TABLES}))
    parser.add_argument("--cells", nargs="+", help="only these cells, in every table that has them")
    parser.add_argument("--one-point", action="store_true", help="each cell's first learning rate and search point")
    parser.add_argument("--quick", action="store_true", help="CI's subset: every launcher, recipe and restart once")
    parser.add_argument("--nproc", type=int, default=2, help="processes of a multi-process run (default 2)")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    calls = plan(args)
    if not calls:
        parser.error(f"no table of {args.profiles} {args.tables or ''} has the cells {args.cells}")
    started = time.monotonic()
    where = home(args.quick)
    planned: list[Path] = []
    for table, profile, extra in calls:
        print(f"== rehearsal of {table} ({profile}) {' '.join(extra)}", flush=True)
        runner = [table, "--profile", profile, "--rehearse", "--nproc", str(args.nproc), "--keep-going"]
        runner += ["--runs", str(where / table / profile), "--out", str(where / "results" / table)]
        try:
            code = reproduce.main([*runner, "--seeds", SEEDS[profile], *extra])
        except SystemExit as stop:  # its base model failed, or a run of another config is in the way
            print(stop.code, file=sys.stderr, flush=True)
            code = 1
        if code == 2:  # a bad argument or config: nothing ran
            return 2
        planned += [f for f in folders(table, profile, extra, where) if f not in planned]
    rows = [check(folder, where) for folder in planned]
    header = "| table | profile | run | launcher | processes | seconds | status | saved adapter, reloaded |"
    bad = [r for r in rows if r.status != "finished" or r.reload != "same scores"]
    report = "\n".join(
        [
            "# Rehearsal of the GPU profiles on this machine (experiments/rehearse.py)",
            "",
            f"{len(rows)} runs, {len(rows) - len(bad)} finished with a saved adapter that scores as the run did; "
            f"{time.monotonic() - started:.0f} s.",
            "",
            header,
            "|---|---|---|---|---|---|---|---|",
            *map(line, rows),
        ]
    )
    (where / "rehearsal.md").write_text(report + "\n")
    print(report, flush=True)
    for r in bad:
        print(f"error: {r.status}, reload {r.reload}: {r.folder}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
