"""Reproduce one of the paper's tables: the one runner for every table, driven by configs/experiment/<table>.yaml.

    python experiments/reproduce.py table2 --profile tiny --seeds 0 1 2
    python experiments/reproduce.py table1 --profile tiny --tasks metamath --seeds 0
    python experiments/reproduce.py table2 --profile gpu --seeds 0                    # one GPU, one run at a time
    python experiments/reproduce.py table1 --profile paper --launcher deepspeed_zero2 --nproc 8 --dry-run

The experiment config names the table's tasks (`table.tasks`, a list or one per profile), its cells per profile
(`grid.<profile>`: an adapter with its settings and fixed `overrides`, a learning-rate grid, optionally per task,
and an optional `search` over other settings, every combination of which is run and the best reported) and an
optional base model to train first (`base.<profile>`: its learning rate, seed, `overrides`, its own `task` config,
and `forgetting: true` to have every cell probe what the base was trained on), overrides for every cell of a profile
(`all_cells.<profile>`), and how learning rates are chosen (`table.tune`); `--set` adds Hydra overrides to every
run. Every cell x task x learning rate x search point x seed is one run folder under
runs/<table>/<profile>/[<task>/]; finished runs are skipped, unfinished ones resume, and a finished run of another
config stops the command. The runs go in this process (the CPU profile, `--jobs` side by side) or each through
`python -m mora.launch` with `--launcher` / `--nproc` (one node of GPUs), or, with `--submit slurm`, each as a SLURM
job on one node running that same command (configs/cluster/slurm.yaml, `--slurm KEY=VALUE` over it); `--dry-run`
prints the command of every run instead. Then the table's reporter (`mora.reporting.<table.layout>`) writes
results/<table>/.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import importlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mora.cli import OneLineParser
from mora.config import one_line
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.reporting.common import best_points, gather
from mora.reporting.common import point as point_of
from mora.training.run import config_hash, validate

if str(REPO_ROOT) not in sys.path:  # run as a script: experiments.rehearsal, as when imported
    sys.path.insert(0, str(REPO_ROOT))
PROFILES = ("tiny", "gpu", "paper")
IN_PROCESS = "in-process"
DEFAULT_LAUNCHER = {"tiny": IN_PROCESS, "gpu": "local", "paper": "deepspeed_zero2"}  # gpu: one GPU, a process a run
LAUNCHERS = (IN_PROCESS, "local", "ddp", "deepspeed_zero2", "deepspeed_zero3")
CELL_KEYS = ("r", "alpha", "compression", "loraplus_ratio", "rank_pattern", "args")
# --submit: each run a job through submitit, on SLURM (sbatch) or, to test the same jobs, on this machine
SUBMITTERS = ("slurm", "local")
# table.tune, how a table's learning rates are chosen: null, every seed on every point of a cell's grid (the best by
# the mean over seeds); first_seed, each grid on the first seed of --seeds and the other seeds at its best point
TUNINGS = (None, "first_seed")
SLURM_CONFIG = CONFIG_DIR / "cluster" / "slurm.yaml"
REHEARSALS = REPO_ROOT / "runs" / "rehearsal"  # --rehearse: its runs, tables and stand-in models, apart from results/
REHEARSAL_BANNER = (
    "> **Rehearsal** (experiments/rehearsal.py): this profile's code path at toy sizes, on this machine. The numbers "
    "say nothing about the method; only that every run of the table trains, evaluates, saves and reports.\n\n"
)


@dataclass
class Run:
    task: str
    cell: str
    lr: float
    seed: int
    folder: Path
    overrides: list[str] = field(default_factory=list)
    launcher: str | None = None  # the cell's own launcher on GPUs (ReLoRA/ReMoRA restarts need DDP, not DeepSpeed)


@functools.lru_cache(maxsize=512)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The run config of `overrides`, composed once per process (0.15 s each: a table's runs are composed to check
    them, to compare with kept records and to run); each call gets its own copy (20 ms)."""
    return copy.deepcopy(_composed(tuple(overrides)))


def experiment(table: str, profile: str) -> dict[str, Any]:
    """The experiment config's table, cells and base model for one profile."""
    if not (CONFIG_DIR / "experiment" / f"{table}.yaml").is_file():
        tables = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
        raise ValueError(f"unknown table {table!r}; configs/experiment has {', '.join(tables)}")
    cfg = compose_cfg([f"profile={profile}", f"experiment={table}"])
    if profile not in cfg.grid:
        raise ValueError(f"experiment {table} has no grid for profile {profile!r}")
    section = OmegaConf.to_container(cfg.table, resolve=True)
    if section.get("tune") not in TUNINGS:
        raise ValueError(
            f"experiment {table}: table.tune {section['tune']!r} is not one of null, first_seed; first_seed runs "
            "each grid on the first of --seeds and the other seeds at its best"
        )
    if isinstance(section["tasks"], dict):  # tasks per profile (Table 4: metamath on the paper's, uuid on tiny)
        section["tasks"] = section["tasks"][profile]
    every_cell = OmegaConf.to_container(cfg.all_cells, resolve=True) if "all_cells" in cfg else None
    return {
        "table": section,
        "cells": OmegaConf.to_container(cfg.grid[profile], resolve=True),
        "base": (OmegaConf.to_container(cfg.base, resolve=True) or {}).get(profile) if "base" in cfg else None,
        "all_cells": (every_cell or {}).get(profile) or {},
    }


def _value(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_overrides(key: str, value: Any) -> list[str]:
    """Hydra overrides that set `key` to a cell's value; a mapping leaf by leaf, added where the adapter config has
    no such key (`++`: a method's `args`, DoRA's rank_pattern)."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in cell_overrides(f"{key}.{k}", v)]
    return [f"++{key}={_value(value)}" if key.count(".") > 1 else f"{key}={_value(value)}"]


def literal(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged: strings quoted (commas, brackets, colons and
    "null" stay text), floats to the last digit."""
    if isinstance(value, str):  # Hydra unescapes a backslash only before a quote: double those, then escape quotes
        return "'" + re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'") + "'"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{literal(v)}" for k, v in value.items()) + "}"
    return str(value)


def literal_overrides(key: str, value: dict[str, Any]) -> list[str]:
    """`++key.leaf=literal` for every leaf of a mapping (an empty mapping: `++key={}`): a task section passed to the
    cells as it was composed for the base."""
    if isinstance(value, dict) and value:
        return [o for k, v in value.items() for o in literal_overrides(f"{key}.{k}", v)]
    return [f"++{key}={literal(value)}"]


def search_points(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the cell's `search` settings ({} when it has none)."""
    search = cell.get("search") or {}
    return [dict(zip(search, values, strict=True)) for values in itertools.product(*search.values())]


def cell_lrs(cell: dict[str, Any], task: str) -> list[float]:
    lrs = cell["lrs"]
    return list(lrs[task] if isinstance(lrs, dict) else lrs)


def runs(
    table: str,
    profile: str,
    seeds: list[int],
    tasks: list[str],
    root: Path,
    cells: list[str] | None = None,
    extra: list[str] | None = None,
    one_point: bool = False,
) -> tuple[list[Run], Run | None]:
    """The table's runs for these tasks, seeds and cells (None: all), with the `extra` Hydra overrides added to
    every run, and the base-model run they start from (`one_point`: each cell's first learning rate and search
    point only)."""
    spec = experiment(table, profile)
    common = [f"profile={profile}", f"experiment={table}", "train.progress=false"]
    extra = list(extra or [])
    base, probes = None, []
    if spec["base"]:
        b = spec["base"]
        folder = root / "base"
        base = Run(b.get("task") or spec["table"]["tasks"][0], "base", b["lr"], b["seed"], folder)
        base.overrides = [*common, f"task={base.task}", "adapter=fft", f"train.lr={b['lr']}", f"seed={b['seed']}"]
        base.overrides += [f"{k}={_value(v)}" for k, v in b.get("overrides", {}).items()]
        base.overrides += [*extra, f"run.dir={folder}"]
        if b.get("forgetting"):
            probes = literal_overrides("task.probes", base_probes(base.overrides))
    # all_cells.<profile>: overrides every cell of the profile gets before its own (a mapping as a literal section)
    every = [
        o
        for k, v in spec["all_cells"].items()
        for o in (literal_overrides(k, v) if isinstance(v, dict) else [f"{k}={literal(v)}"])
    ]
    nested = len(spec["table"]["tasks"]) > 1
    out = []
    for task in tasks:
        for cell in spec["cells"]:
            if task not in cell.get("tasks", spec["table"]["tasks"]) or (cells and cell["name"] not in cells):
                continue
            lrs, points = cell_lrs(cell, task), search_points(cell)
            if one_point:
                lrs, points = lrs[:1], points[:1]
            for lr, point, seed in itertools.product(lrs, points, seeds):
                tag = "".join(f"-{k.rsplit('.', 1)[-1]}{_value(v)}" for k, v in point.items())
                name = f"{cell['name']}-lr{lr:g}{tag}-s{seed}"
                folder = root / task / name if nested else root / name
                overrides = [*common, f"task={task}", f"adapter={cell['adapter']}", f"train.lr={lr}", f"seed={seed}"]
                overrides += [o for k in CELL_KEYS if k in cell for o in cell_overrides(f"adapter.{k}", cell[k])]
                overrides += every
                overrides += [f"{k}={_value(v)}" for k, v in (cell.get("overrides") or {}).items()]
                overrides += [f"{k}={_value(v)}" for k, v in point.items()]
                if base is not None:
                    overrides += [f"model.pretrained={base.folder / 'adapter'}", *probes]
                overrides += [*extra, f"run.dir={folder}"]
                out.append(Run(task, cell["name"], lr, seed, folder, overrides, cell.get("launcher")))
    return out, base


def at_best(
    todo: list[Run], seed: int, reporter: Any, done: list[dict[str, Any]], cells: list[dict[str, Any]]
) -> tuple[list[Run], list[str]]:
    """The runs of `todo` at each cell's best point (learning rate and search point) among its finished runs of
    `seed`, by the reporter's TUNING_SCORE, and the cells that have no such run."""
    of_seed = [r for r in done if r["summary"]["seed"] == seed]
    best = {cell: point_of(group[0]) for cell, group in best_points(of_seed, cells, *reporter.TUNING_SCORE).items()}
    missing = sorted({r.cell for r in todo} - set(best))
    return [r for r in todo if r.cell in best and r.folder.name.rsplit("-s", 1)[0] == best[r.cell]], missing


def tuning_phases(
    todo: list[Run], seeds: list[int], tune: str | None, at_best_of: int | None
) -> list[tuple[list[Run], int | None]]:
    """The runs in the order they go, each group with the seed whose best point it is cut to (None: all of it):
    --at-best-of SEED cuts every run; table.tune first_seed runs the first seed's grids, then the others at its
    best (each cut once the first seed's runs are done)."""
    if at_best_of is not None:
        return [(todo, at_best_of)]
    if tune == "first_seed" and len(seeds) > 1:
        first = seeds[0]
        return [([r for r in todo if r.seed == first], None), ([r for r in todo if r.seed != first], first)]
    return [(todo, None)]


def base_probes(overrides: list[str]) -> dict[str, Any]:
    """What a base model was trained on, as the cells' probes (`base.<profile>.forgetting`: each cell's forgetting
    is the change of these scores from the base's): a mixture's parts, or the base's task itself, by its name."""
    task = OmegaConf.to_container(compose_cfg(overrides).task, resolve=True)
    if task.get("parts"):
        return task["parts"]
    return {str(task["name"]): {k: v for k, v in task.items() if k != "probes"}}


def launch_overrides(run: Run, launcher: str, nproc: int) -> list[str]:
    """The launcher group a run gets outside this process (part of its config, hence of its hash)."""
    if launcher in (IN_PROCESS, "local"):
        return []
    return [f"launcher={run.launcher or launcher}", f"launcher.num_processes={nproc}"]


def portable_hash(cfg: Any, root: Path | None) -> str:
    """config_hash with a base model that the runner trained under `root` named by its place there
    (base/adapter): a run recorded in another checkout, or another folder, is the same run."""
    pretrained = cfg.model.get("pretrained")
    if root is not None and pretrained and Path(str(pretrained)).is_relative_to(root):
        cfg = cfg.copy()
        cfg.model.pretrained = str(Path(str(pretrained)).relative_to(root))
    return config_hash(cfg)


def _finished_config(folder: Path) -> Any:
    """The config of the finished run in folder, or None."""
    summary = folder / "summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("status") == "finished"):
        return None
    return OmegaConf.load(folder / "config.yaml")


def finished(run: Run, root: Path, launch: list[str] | None = None) -> bool:
    """True when the folder holds a finished run of exactly this config (`launch`: its launcher overrides); a
    finished run of another config (the profile or grid changed since) stops the command rather than entering
    the table."""
    done = _finished_config(run.folder)
    if done is None:
        return False
    if portable_hash(done, root) != portable_hash(compose_cfg([*(launch or []), *run.overrides]), root):
        raise SystemExit(
            f"error: {run.folder} holds a finished run of a different config; delete it or pass --runs elsewhere"
        )
    return True


def recorded(run: Run, root: Path, records: Path, launch: list[str] | None = None) -> bool:
    """True when the table's kept records (results/<table>/runs/..., committed) hold this run with exactly this
    config: it is not run again, and the table shows the record. A kept record of another config (the profile or
    grid changed since it was recorded) stops the command: nothing committed is replaced by a run of another
    config."""
    place = run.folder.relative_to(root)
    record = records / place
    done = _finished_config(record)
    if done is None:
        return False
    made_in = Path(str(done.run.dir)).parents[len(place.parts) - 1] if done.run.get("dir") else None
    if portable_hash(done, made_in) != portable_hash(compose_cfg([*(launch or []), *run.overrides]), root):
        raise SystemExit(
            f"error: {record} keeps a run of that name with another config; to run the new config, write its table "
            "elsewhere (--out, make: OUT=) or delete the record"
        )
    return True


def rehearse(runs: list[Run], launcher: str, nproc: int, root: Path) -> None:
    """Every run at rehearsal size (experiments/rehearsal.py), in place: its launcher, optimizer, schedule shape,
    precision, restarts and evaluation as its profile has them."""
    from experiments.rehearsal import replace, shrunk

    for run in runs:
        launch = launch_overrides(run, launcher, nproc)
        cfg = compose_cfg([*launch, *run.overrides])
        world = int(cfg.launcher.num_processes) if launch else 1
        tiny = compose_cfg(["profile=tiny", f"task={run.task}"])
        run.overrides = replace(run.overrides, shrunk(cfg, tiny, world, root, REHEARSALS / "models"))


def check_run(run: Run, launcher: str, nproc: int) -> None:
    """The run's composed config through the engine's checks (mora.training.run.validate), as its launcher will see
    it: a bad value in --set or in the experiment config stops the command before any run starts."""
    overrides = [*launch_overrides(run, launcher, nproc), *run.overrides]
    cfg = compose_cfg(overrides)
    world = 1 if launcher in (IN_PROCESS, "local") else int(cfg.launcher.num_processes) * int(cfg.launcher.num_machines)
    try:
        validate(cfg, world)
    except ValueError as error:
        raise ValueError(f"{error} (run {run.folder.name})") from None


def command(run: Run, launcher: str, nproc: int) -> list[str]:
    """The command line of one run outside this process."""
    if launcher in (IN_PROCESS, "local"):
        return [sys.executable, "-m", "mora.train", *run.overrides]
    return [sys.executable, "-m", "mora.launch", *launch_overrides(run, launcher, nproc), *run.overrides]


def run_in_process(overrides: list[str], threads: int) -> str:
    import torch

    from mora.training.run import run

    torch.set_num_threads(threads)
    summary = run(compose_cfg(overrides))
    return f"{summary['method']} lr={summary['lr']} seed={summary['seed']}: {summary['status']} ({summary['wall_s']} s)"


def slurm_parameters(overrides: list[str]) -> dict[str, Any]:
    """configs/cluster/slurm.yaml with `KEY=VALUE` overrides; an unknown key or a bad value is a ValueError."""
    params = OmegaConf.load(SLURM_CONFIG)
    bad = [o for o in overrides if "=" not in o or o.split("=", 1)[0] not in params]
    if bad:
        raise ValueError(f"--slurm {bad}: each is KEY=VALUE with a key of {SLURM_CONFIG.name}: {', '.join(params)}")
    params = OmegaConf.to_container(OmegaConf.merge(params, OmegaConf.from_dotlist(overrides)), resolve=True)
    for key, least in (("time", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("mem_gb", 1)):
        value = params[key]
        if not (value is None and key == "mem_gb") and (type(value) is not int or value < least):
            raise ValueError(f"--slurm {key}={value}: give a whole number >= {least}")
    return params


def executor(cluster: str, params: dict[str, Any], folder: Path) -> Any:
    """submitit's executor (AutoExecutor) for one-node jobs of one task: mora.launch starts the run's processes on
    the node."""
    import submitit

    jobs = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    jobs.update_parameters(
        timeout_min=params["time"],
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=params["gpus_per_node"],
        cpus_per_task=params["cpus_per_task"],
        **({"mem_gb": params["mem_gb"]} if params["mem_gb"] else {}),
        **{f"slurm_{k}": params[k] for k in ("partition", "account", "qos", "constraint") if params[k]},
        slurm_setup=list(params["setup"]),
        slurm_additional_parameters=dict(params["additional_parameters"]),
    )
    return jobs


def submit(
    todo: list[Run], launcher: str, nproc: int, cluster: str, params: dict[str, Any], folder: Path
) -> list[tuple[Run, Any]]:
    """Each run's command line as one job through submitit; returns (run, job) pairs."""
    from submitit.helpers import CommandFunction

    jobs = executor(cluster, params, folder)
    submitted = []
    for run in todo:
        jobs.update_parameters(name=f"mora-{run.folder.parent.name}-{run.folder.name}")
        job = jobs.submit(CommandFunction(command(run, launcher, nproc), cwd=str(REPO_ROOT)))
        print(f"{run.folder}: job {job.job_id} (logs: {job.paths.stdout.parent})", flush=True)
        submitted.append((run, job))
    return submitted


def wait(submitted: list[tuple[Run, Any]], keep_going: bool = False) -> list[str]:
    """Every job's end; a failed one stops the command with its run and log, or with keep_going is listed (the
    failed runs' lines are returned)."""
    failed = []
    for run, job in submitted:
        try:
            job.result()
        except Exception as error:  # submitit's FailedJobError, UncompletedJobError (time limit, node failure)
            line = f"the job of {run.folder} ({job.job_id}) failed: {type(error).__name__}; see {job.paths.stderr}"
            if not keep_going:
                raise SystemExit(f"error: {line}") from None
            print(line, flush=True)
            failed.append(line)
            continue
        print(f"{run.folder.name}: job {job.job_id} finished", flush=True)
    return failed


def execute(todo: list[Run], launcher: str, nproc: int, jobs: int, keep_going: bool = False) -> list[str]:
    """Run every run of todo; a failed run outside this process stops the command, or with keep_going is listed
    and the next starts (the failed runs' lines are returned). A run in this process that fails raises."""
    if launcher == IN_PROCESS:
        threads = max(1, (os.cpu_count() or 2) // jobs)
        if jobs == 1:
            for run in todo:
                print(run_in_process(run.overrides, threads), flush=True)
            return []
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for line in pool.map(run_in_process, [r.overrides for r in todo], [threads] * len(todo)):
                print(line, flush=True)
        return []
    failed = []
    for run in todo:
        cmd = command(run, launcher, nproc)
        print(f"{run.folder}: {shlex.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=REPO_ROOT)
        status = "finished" if not result.returncode else f"failed (exit code {result.returncode})"
        name = run.launcher or launcher
        processes = 1 if name == "local" else nproc
        what = f"{run.cell} [{run.task}] lr={run.lr:g} seed={run.seed}"
        seconds = time.monotonic() - started
        print(f"{what}: {name} x {processes}, {seconds:.0f} s, {status}: {run.folder}", flush=True)
        if result.returncode:
            line = f"the run in {run.folder} failed (exit code {result.returncode}); see its summary"
            if not keep_going:
                raise SystemExit(f"error: {line}")
            failed.append(line)
    return failed


# the make variable behind each option (Makefile, REPRODUCE_ARGS), named in an error about it
MAKE_VARIABLES = {
    "--profile": "PROFILE",
    "--seeds": "SEED / SEEDS",
    "--tasks": "TASKS",
    "--cells": "CELLS",
    "--launcher": "LAUNCHER",
    "--nproc": "NPROC",
    "--set": "SET",
    "--submit": "SUBMIT",
    "--slurm": "SLURM",
    "--keep-going": "KEEP_GOING",
    "--out": "OUT",
}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, make_variables=MAKE_VARIABLES
    )
    parser.add_argument("table", help="an experiment config: table1, table2")
    parser.add_argument("--profile", default="tiny", choices=PROFILES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", help="run only these of the table's tasks (e.g. metamath)")
    parser.add_argument(
        "--cells", nargs="+", help="run only these cells (rows) or shell patterns of them, e.g. lora-r8 'mora-*'"
    )
    parser.add_argument(
        "--launcher", choices=LAUNCHERS, help="default: in-process (tiny), local (gpu), deepspeed_zero2 (paper)"
    )
    parser.add_argument("--nproc", type=int, help="processes per node (default: every visible GPU, or 8)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (in-process only)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="Hydra overrides for every run")
    parser.add_argument("--runs", type=Path, help="default: runs/<table>/<profile>")
    parser.add_argument("--out", type=Path, help="default: results/<table>")
    parser.add_argument("--dry-run", action="store_true", help="print every run's command; run nothing")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failed run or job, start the next; the table from the others, then exit 1 naming the failed",
    )
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="every run at toy sizes through its profile's own code path (experiments/rehearsal.py), into "
        "runs/rehearsal/",
    )
    parser.add_argument("--one-point", action="store_true", help="each cell's first learning rate and search point")
    parser.add_argument(
        "--at-best-of",
        type=int,
        metavar="SEED",
        help="each cell only at the learning rate (and search point) where its finished runs of SEED score best: "
        "a grid tuned on one seed, the other seeds at its best (tables whose reporter has a TUNING_SCORE)",
    )
    parser.add_argument(
        "--submit", choices=SUBMITTERS, help="each run a job on one node through submitit: slurm, or local to test"
    )
    parser.add_argument(
        "--slurm", nargs="+", default=[], metavar="KEY=VALUE", help="job settings over configs/cluster/slurm.yaml"
    )
    args = parser.parse_args(argv)
    slurm = None
    if args.submit:
        if importlib.util.find_spec("submitit") is None:
            parser.error("--submit sends jobs through submitit, which is not installed: pip install 'mora-lab[slurm]'")
        try:
            slurm = slurm_parameters(args.slurm)
        except ValueError as error:
            parser.error(str(error))
        if args.launcher == IN_PROCESS:
            parser.error("--launcher in-process runs in this process; a job runs a command (--launcher local, ...)")
        if args.submit == "slurm" and not args.dry_run and not (shutil.which("sbatch") and shutil.which("srun")):
            parser.error("--submit slurm needs SLURM's sbatch and srun (a login node); --dry-run prints the jobs")
    elif args.slurm:
        parser.error("--slurm sets the jobs of --submit slurm|local")
    if args.nproc is None:
        import torch

        args.nproc = (slurm or {}).get("gpus_per_node") or torch.cuda.device_count() or 8
    for name in ("jobs", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    try:
        spec = experiment(args.table, args.profile)
    except ValueError as error:
        parser.error(str(error))
    table_tasks = list(spec["table"]["tasks"])
    tasks = args.tasks or table_tasks
    unknown = [t for t in tasks if t not in table_tasks]
    if unknown:
        parser.error(f"--tasks {unknown} are not tasks of {args.table}; it has {', '.join(table_tasks)}")
    names = [c["name"] for c in spec["cells"]]
    if args.cells:  # names or shell patterns of names ('*-s3000')
        unknown = [c for c in args.cells if not fnmatch.filter(names, c)]
        if unknown:
            parser.error(f"--cells {unknown} are not cells of {args.table}; it has {names}")
        args.cells = [n for n in names if any(fnmatch.fnmatchcase(n, c) for c in args.cells)]
    launcher = args.launcher or DEFAULT_LAUNCHER[args.profile]
    if args.submit and launcher == IN_PROCESS:
        launcher = "local"  # the tiny profile's runs as jobs: one process each
    root = args.runs or (REHEARSALS if args.rehearse else REPO_ROOT / "runs") / args.table / args.profile
    bad = [o for o in args.set if "=" not in o]
    if bad:
        parser.error(f"--set {bad}: each override is KEY=VALUE, e.g. train.micro_batch=2")
    try:
        todo, base = runs(args.table, args.profile, args.seeds, tasks, root, args.cells, args.set, args.one_point)
        if args.rehearse:
            rehearse(([base] if base else []) + todo, launcher, args.nproc, root)
        for run in ([base] if base else []) + todo:  # every run's config, before the first starts
            check_run(run, launcher, args.nproc)
    except (ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    phases = tuning_phases(todo, args.seeds, spec["table"].get("tune"), args.at_best_of)
    if args.dry_run:
        if slurm is not None:
            print(f"# {args.submit} jobs, one a run, one node each: " + json.dumps(slurm, sort_keys=True))
        for run in ([base] if base else []) + phases[0][0]:
            print(shlex.join(command(run, launcher, args.nproc)))
        for later, seed in phases[1:]:
            seeds = sorted({r.seed for r in later})
            print(f"# then seed{'s' * (len(seeds) > 1)} {' '.join(map(str, seeds))}, each cell at the best point of "
                  f"its seed-{seed} runs (table.tune)")  # fmt: skip
        return 0

    def go(runs: list[Run], jobs: int, keep_going: bool) -> list[str]:
        if args.submit:
            return wait(submit(runs, launcher, args.nproc, args.submit, slurm, root / ".submitit"), keep_going)
        return execute(runs, launcher, args.nproc, jobs, keep_going)

    reporter = importlib.import_module(f"mora.reporting.{spec['table']['layout']}")
    table_out = spec["table"].get("out", f"results/{args.table}")  # table.out: a shared folder
    out = args.out or (REHEARSALS / table_out if args.rehearse else REPO_ROOT / table_out)
    records = reporter.kept(out, args.profile, root)
    if args.rehearse:  # a rehearsal's table keeps no records of its own: its runs lie in runs/rehearsal/ already
        shutil.rmtree(records, ignore_errors=True)

    def launch(run: Run) -> list[str]:
        return launch_overrides(run, launcher, args.nproc)

    if any(best_of is not None for _, best_of in phases) and not hasattr(reporter, "TUNING_SCORE"):
        print(f"error: a grid tuned on one seed needs a reporter that scores runs; {reporter.__name__} has no "
              "TUNING_SCORE", file=sys.stderr)  # fmt: skip
        return 2
    if base is not None:
        recorded(base, root, records, launch(base))  # the kept cells started from this base, or stop
    failed: list[str] = []
    skipped: list[str] = []  # cells whose later seeds could not run: their first seed's grid failed (--keep-going)
    started = 0
    for todo, best_of in phases:
        if best_of is not None:  # each cell at the best point of seed best_of's finished runs
            todo, missing = at_best(todo, best_of, reporter, gather(root, records), spec["cells"])
            if missing and not failed:  # a first seed's grid is missing here only where it failed (--keep-going)
                print(f"error: --at-best-of {best_of}: cells {missing} have no finished run of seed {best_of}; run "
                      f"them with --seeds {best_of} first", file=sys.stderr)  # fmt: skip
                return 2
            skipped += [f"{cell} (no finished run of seed {best_of} to take the best of)" for cell in missing]
        todo = [r for r in todo if not finished(r, root, launch(r)) and not recorded(r, root, records, launch(r))]
        if base is not None and todo and not finished(base, root, launch(base)):
            print(f"{args.table} ({args.profile}): training the base model in {base.folder}", flush=True)
            go([base], 1, keep_going=False)  # every cell starts from it
        seeds = " ".join(str(s) for s in sorted({r.seed for r in todo}))
        print(f"{args.table} ({args.profile}): {len(todo)} runs to do in {root}{f' (seeds {seeds})' * bool(todo)}",
              flush=True)  # fmt: skip
        started += len(todo)
        failed += go(todo, args.jobs, args.keep_going)
    try:  # every run so far, with the records the table keeps
        paths = reporter.write_results(root, out, args.profile, spec["cells"], table_tasks)
    except ValueError as error:  # the runs are done; too few of them for a table yet (e.g. --cells of one method)
        print(f"no table written: {error}", flush=True)
        paths = []
    if args.rehearse:  # marked, whoever reads them
        for path in (p for p in paths if p.suffix == ".md"):
            path.write_text(REHEARSAL_BANNER + path.read_text())
    if paths:
        print("wrote " + ", ".join(map(str, paths)))
    if failed:
        print(f"error: {len(failed)} of {started} runs failed: {'; '.join(failed)}", file=sys.stderr)
    if skipped:
        print(f"error: cells not run at their best: {'; '.join(skipped)}", file=sys.stderr)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
