"""The one prepared check for a single GPU (about 10 minutes): environment, then the parts chosen (`--parts`), each
in the order of PARTS, what has never run on a GPU first: the per-layer benchmark in bf16 at LLaMA-7B's shapes with
CUDA-event timing (MoRA's compiled GPU path against its eager path and LoRA), the methods comparison's `gpu` profile
for one seed, Table 3's `gpu` profile (pretraining from scratch, not among the default parts: it takes a lent GPU's
call alone), the merge benchmark, Table 2's `gpu` profile for one seed (by default layer, merge and methods: their
budgets fill the 9 minutes a lent GPU's 10 leave, the methods part cut at its budget; docs/gpu.md).

    bash scripts/gpu_check.sh OUT                      # on the GPU node, in the checkout (after the wheelhouse install)
    bash scripts/gpu_check.sh OUT --parts table2       # one part
    bash scripts/gpu_check.sh OUT --dry                # on CPU, tiny sizes, in seconds: what the tests run

It writes two files per part and two of its own into OUT and no folders, each stamped with the commit and the
device, so that they are easy to collect from a remote node: gpu_check.json / .md (environment, every part's status
and time), layer.json / .md (base, LoRA r = 8 / 256, MoRA truncation / sharing / decouple / rope at r = 8 / 256
on the compiled and the eager path: forward and forward + backward, and each variant's first call with its
compilation), merge.json / .md (merging MoRA into the weight), methods.json / .md, table3.json / .md and table2.json /
.md (every run of the table's `gpu` profile and the table). Each part runs in its own process group with its own
time budget (--methods-s, --table3-s, --layer-s, --merge-s, --table2-s); a part stopped at its budget keeps what it
wrote so far (the benchmarks rewrite their files after every case; a table's json is rewritten every 10 s with the
runs so far, and the table is made from the runs that finished). SIGTERM / SIGINT stop the running part's process
group and write the report. A table's runs lie in runs/<table>/gpu-<commit>, so a second call at one commit
resumes. MORA_COMMIT, where set, names the commit a copied checkout came from.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

POLL_S = 10.0  # how often a running part's progress files are rewritten
# the parts in the order a check runs them: what has never run on a GPU first
PARTS = {
    "layer": "the per-layer benchmark: MoRA's compiled GPU path (never run on a GPU), its eager path and LoRA",
    "methods": "the methods comparison, gpu profile (never run on a GPU)",
    "table3": "Table 3, gpu profile: pretraining the 250M architecture from scratch (never run on a GPU)",
    "merge": "the merge benchmark",
    "table2": "Table 2, gpu profile (on an H200, 2026-11-30)",
}
TABLES = ("methods", "table3", "table2")  # the parts that run a table's gpu profile through the table runner
DEFAULT_PARTS = ("layer", "methods", "merge")  # 540 s of budgets in a 600 s call
# each part's time budget on a GPU (docs/gpu.md: what one lent GPU's 10 minutes hold); a dry run has none unless given.
# The layer part compiles 8 graphs (4 operators x 2 ranks) at 4096 -> 4096 first; the methods part needs about 470 s
# for all ten methods (configs/experiment/methods.yaml), so among the defaults it stops after LoRA, MoRA and a few
# others (alone: --parts methods --methods-s 480)
BUDGETS_S = {"layer": 200.0, "methods": 320.0, "table3": 540.0, "merge": 20.0, "table2": 480.0}
# a dry run's cells, unless --cells names them: each table's first cells at its first learning rate
DRY_CELLS = {
    "methods": ["lora-r8", "mora-r8", "hira-r8"],
    "table3": ["lora", "mora"],
    "table2": ["fft", "lora-r8", "mora-r8"],
}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "hydra-core", "omegaconf", "numpy")
# a dry run's tables: the gpu profile's configs and runner at a size a CPU does in seconds
DRY_SIZES = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "train.global_batch=4",
    "train.micro_batch=4",
    "train.steps=2",
    "train.eval_steps=[2]",
    "train.log_every=1",
    "train.mixed_precision=null",
]
# and each table's task at such a size (Table 3: the python_docs corpus, read in seconds, for package_docs)
DRY_TASK_SIZES = {
    "methods": ["task.n_pairs=8"],
    "table2": ["task.n_pairs=8"],
    "table3": ["task.source.path=python_docs", "task.eval_source.path=python_docs", "task.vocab_size=512"]
    + ["task.block_size=32", "task.train_tokens=4096", "task.eval.tokens=1024"],
}


def environment(dry: bool) -> dict[str, Any]:
    import torch

    from mora.provenance import commit

    head, dirty = commit()
    env: dict[str, Any] = {
        "commit": head,
        "git_dirty": dirty,
        "dry": dry,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {},
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    for name in PACKAGES:
        try:
            env["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["versions"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            visible_gpus=torch.cuda.device_count(),
        )
    from mora.adapters.compiled import setting, wanted

    # MORA_COMPILE, and whether a MoRA layer on this device takes the compiled path (auto: not where Triton cannot
    # compile, e.g. without its package; the runs' env.json say it too)
    env["mora_compile"] = setting()
    env["mora_compiled"] = wanted(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        result = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()
    return env


class Stopped(Exception):
    """SIGTERM / SIGINT from outside (a job's time limit, a timeout, Ctrl-C): the running part is stopped, and what
    every part wrote so far is reported."""


def _stop_on_signal(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: the report is written undisturbed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def _stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_part(
    name: str, cmd: list[str], budget_s: float | None, poll: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run one part in its own process group; at its budget (None: none, as in a dry run, whose parts must never be
    cut short by a slow machine), or when this check is stopped, the whole group is stopped (a table run's training
    processes too). `poll` runs about every 10 s meanwhile (files that must come back even if this process is
    killed). Its output goes to this process's."""
    print(f"== {name} (budget {'none' if budget_s is None else f'{budget_s:.0f} s'}): {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    path = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))  # the checkout's mora,
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}  # installed or not
    proc: subprocess.Popen | None = None
    try:  # a stop that comes while the part starts stops it too
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)
        while True:
            left = math.inf if budget_s is None else budget_s - (time.monotonic() - start)
            try:
                code = proc.wait(timeout=max(0.0, min(left, POLL_S)))
                status = "finished" if code == 0 else f"failed (exit code {code})"
                break
            except subprocess.TimeoutExpired:
                if left <= POLL_S:
                    _stop_group(proc)
                    status = "stopped at its budget"
                    break
                if poll is not None:
                    poll()
    except Stopped as why:
        if proc is not None:
            _stop_group(proc)
        status = f"stopped by {why}"
    wall = time.monotonic() - start
    print(f"== {name}: {status} after {wall:.0f} s", flush=True)
    return {"status": status, "wall_s": round(wall, 1), "budget_s": budget_s, "command": cmd[1:]}


def bench_commands(out: Path, dry: bool) -> dict[str, list[str]]:
    py = sys.executable
    if dry:
        sizes = ["--device", "cpu", "--dtype", "float32", "--shapes", "64x96", "96x64", "--ranks", "2", "8"]
        # inductor on the CPU: the compiled path at one shape and rank (a few seconds a graph)
        layer = [py, "bench/layer.py", *sizes[:4], "--shapes", "64x96", "--ranks", "8", "--tokens", "1x16"]
        layer += ["--repeats", "2", "--warmup", "1", "--operators", "sharing", "rope"]
        merge = [py, "bench/merge.py", *sizes[:4], "--shapes", "64x96", "--ranks", "8", "--repeats", "2"]
    else:
        sizes = ["--device", "cuda", "--dtype", "bfloat16", "--ranks", "8", "256"]
        layer = [py, "bench/layer.py", *sizes, "--tokens", "8x2048", "1x2048", "--repeats", "30", "--warmup", "5"]
        layer += ["--operators", "truncation", "sharing", "decouple", "rope"]
        merge = [py, "bench/merge.py", *sizes, "--repeats", "20"]
    return {
        "layer": [*layer, "--paths", "compiled", "eager", "--baselines", "lora", "--name", "layer", "--out", str(out)],
        "merge": [*merge, "--operators", "sharing", "rope", "--name", "merge", "--out", str(out)],
    }


def run_summaries(runs: Path) -> list[dict[str, Any]]:
    """Every run's figures so far (a run still going has no summary.json yet, or one that says so)."""
    summaries = []
    for path in sorted(runs.glob("*/summary.json")):
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError:  # being written
            continue
        keep = ("method", "rank", "lr", "seed", "status", "steps", "tokens", "tokens_per_s", "steady_tokens_per_s")
        keep += ("first_step_s", "startup_s", "wall_s")
        keep += ("evals", "trainable_params", "error", "mora_compile_failure")
        summaries.append({"run": path.parent.name, **{k: s.get(k) for k in keep}})
    return summaries


def table_part(
    table: str, out: Path, runs: Path, scratch: Path, budget_s: float | None, dry: bool, cells: list[str] | None
) -> dict[str, Any]:
    """A table's gpu profile for seed 0 through the table runner (one process per run; after a failed run, the
    next), then <table>.md from the runs that finished (the table's own reporter) and <table>.json with every run's
    figures (the runner's own tables go to scratch). <table>.json is rewritten as the runs go, so that a check killed
    from outside still brings back the runs that finished."""
    cmd = [sys.executable, "experiments/reproduce.py", table, "--profile", "gpu", "--seeds", "0", "--keep-going"]
    cmd += ["--runs", str(runs), "--out", str(scratch / table / "reproduce")]
    if cells:  # the cells this table has (main() made sure it has one at least)
        from experiments.reproduce import experiment

        cells = [c for c in cells if c in {cell["name"] for cell in experiment(table, "gpu")["cells"]}]
    cells = cells or (DRY_CELLS[table] if dry else None)
    cmd += ["--cells", *cells] if cells else []
    cmd += (
        ["--one-point", "--set", *DRY_SIZES, *DRY_TASK_SIZES[table]] if dry else []
    )  # dry: each cell at its first learning rate
    print(f"== {table} runs in {runs}", flush=True)

    def progress() -> None:
        running = {"status": "running", "command": cmd[1:], "runs": run_summaries(runs)}
        (out / f"{table}.json").write_text(json.dumps(running, indent=2))

    part = run_part(table, cmd, budget_s, poll=progress)
    summaries = run_summaries(runs)
    part["runs"] = summaries
    finished = [s for s in summaries if s["status"] == "finished" and s["run"] != "base"]
    if finished:
        from experiments.reproduce import experiment

        spec = experiment(table, "gpu")
        reporter = importlib.import_module(f"mora.reporting.{spec['table']['layout']}")
        report = scratch / table / "report"  # plots too, where matplotlib is installed
        md = reporter.write_results(runs, report, "gpu", spec["cells"], spec["table"]["tasks"])[0]
        shutil.copy(md, out / f"{table}.md")
    else:
        (out / f"{table}.md").write_text(f"# {table}, gpu profile\n\nNo run finished within the budget.\n")
    (out / f"{table}.json").write_text(json.dumps(part, indent=2))
    failure = next((s["mora_compile_failure"] for s in summaries if s["mora_compile_failure"]), None)
    return {k: v for k, v in part.items() if k != "runs"} | {"runs_finished": len(finished), "compile_failure": failure}


def markdown(env: dict[str, Any], parts: dict[str, dict[str, Any]]) -> str:
    dirty = {True: " (with uncommitted changes)", False: "", None: " (copied without .git)"}[env["git_dirty"]]
    lines = [
        f"# GPU check{' (dry run on CPU)' if env['dry'] else ''}: {env['device']}",
        "",
        f"Commit {env['commit'][:12]}{dirty}; Python {env['python']}; CUDA {env['cuda']}; {env['platform']}.",
        "",
        f"MoRA's layers take the {'compiled' if env['mora_compiled'] else 'eager'} path "
        f"(MORA_COMPILE={env['mora_compile']}; the layer part times both).",
        "",
        "| package | version |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env["versions"].items()),
        "",
        *([f"nvidia-smi: {env['nvidia_smi']}", ""] if env.get("nvidia_smi") else []),
        "| part | status | wall (s) | budget (s) | files |",
        "|---|---|---|---|---|",
    ]
    for name, part in parts.items():
        extra = f" ({part['runs_finished']} runs finished)" if "runs_finished" in part else ""
        if part.get("compile_failure"):  # MORA_COMPILE=auto: MoRA's runs went on on the eager path
            extra += f"; MoRA's graphs did not compile ({part['compile_failure']}), so its runs took the eager path"
        files = f"{name}.json, {name}.md"
        budget = "–" if part["budget_s"] is None else f"{part['budget_s']:.0f}"
        lines.append(f"| {name} | {part['status']}{extra} | {part['wall_s']} | {budget} | {files} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mora.cli import OneLineParser

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder for the result files (created; two per part and two)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=list(PARTS),
        default=list(DEFAULT_PARTS),
        help=f"the parts to run, in the order {', '.join(PARTS)} (default: {' '.join(DEFAULT_PARTS)})",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        help="a folder for each table's run folders, <runs>/<table> (default runs/<table>/gpu-<commit>: a rerun of "
        "one commit resumes; dry: temporary)",
    )
    for name, what in PARTS.items():
        parser.add_argument(
            f"--{name}-s", type=float, help=f"time budget of {what} (default {BUDGETS_S[name]:g} s; dry: none)"
        )
    parser.add_argument("--cells", nargs="+", help="only these cells of each table (default: all; dry: the first)")
    args = parser.parse_args(argv)
    budgets: dict[str, float | None] = {}
    for name, default in BUDGETS_S.items():
        given = getattr(args, f"{name}_s")
        if given is not None and given <= 0:
            parser.error(f"--{name}-s {given}: a budget is a positive number of seconds")
        budgets[name] = given if given is not None else None if args.dry else default
    for table in (t for t in TABLES if t in args.parts and args.cells):
        from experiments.reproduce import experiment

        names = [cell["name"] for cell in experiment(table, "gpu")["cells"]]
        if not set(args.cells) & set(names):
            parser.error(f"--cells {' '.join(args.cells)}: {table}'s gpu profile has none of them ({' '.join(names)})")
    from mora.adapters.compiled import ENV, setting

    try:
        setting()  # MORA_COMPILE, which every part's MoRA layers read
    except ValueError as error:
        parser.error(str(error))
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; give a new or empty folder (nothing is overwritten)")
    import torch

    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch; run on a GPU node, or pass --dry for the CPU check")
    args.out.mkdir(parents=True, exist_ok=True)
    # a dry check takes the path a GPU takes (MORA_COMPILE=auto there): MoRA's compiled reference math, inductor's
    # C++ here; for this check and its parts only, never for a process that calls main()
    dry = {ENV: "on"} if args.dry and ENV not in os.environ else {}
    with mock.patch.dict(os.environ, dry):
        return run_check(args, args.out.resolve(), budgets)


def run_check(args: argparse.Namespace, out: Path, budgets: dict[str, float | None]) -> int:
    """The environment, then every part chosen, in the order of PARTS, into `out`: 0 when every part finished."""
    env = environment(args.dry)
    print(json.dumps(env, indent=2), flush=True)
    parts: dict[str, dict[str, Any]] = {}

    def report() -> None:  # rewritten after every part, so that a check killed from outside still says where it was
        (out / "gpu_check.json").write_text(json.dumps({"environment": env, "parts": parts}, indent=2))
        (out / "gpu_check.md").write_text(markdown(env, parts))

    report()
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    commands = bench_commands(out, args.dry)
    with tempfile.TemporaryDirectory() as tmp:

        def runs_of(table: str) -> Path:
            if args.runs:
                return (args.runs / table).resolve()
            return Path(tmp) / "runs" / table if args.dry else REPO_ROOT / "runs" / table / f"gpu-{env['commit'][:12]}"

        def part_of(name: str) -> Callable[[], dict[str, Any]]:
            if name in TABLES:
                return lambda: table_part(name, out, runs_of(name), Path(tmp), budgets[name], args.dry, args.cells)
            return lambda: run_part(name, commands[name], budgets[name])

        steps = {name: part_of(name) for name in PARTS if name in args.parts}
        try:
            for name, step in steps.items():
                parts[name] = step()
                report()
                if parts[name]["status"].startswith("stopped by"):
                    break
        except Stopped as why:  # between parts, or while a table part wrote its files
            parts.setdefault(name, {"status": f"stopped by {why}", "wall_s": None, "budget_s": None, "command": []})
    report()
    print((out / "gpu_check.md").read_text(), flush=True)
    return 0 if len(parts) == len(steps) and all(p["status"] == "finished" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
