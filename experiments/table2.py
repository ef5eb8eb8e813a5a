"""Reproduce the paper's Table 2 (UUID memorization): every cell of experiment/table2's grid for the profile, each
learning rate of the cell's grid, each seed; then the table, CSV and plots under results/table2/.

    python experiments/table2.py --profile tiny --seeds 0 1 2 --jobs 2

Finished runs are kept in runs/table2/<profile>/ and skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.reporting.table2 import write_results
from mora.training.run import config_hash

PROFILES = ("tiny", "paper")


def base_overrides(base: dict, profile: str, run_dir: Path) -> list[str]:
    """The pretraining run of the tiny profile's base model: FFT on other pairs (data_seed differs)."""
    return [
        f"profile={profile}",
        "experiment=table2",
        "adapter=fft",
        f"task.n_pairs={base['n_pairs']}",
        f"task.data_seed={base['data_seed']}",
        f"train.steps={base['steps']}",
        f"train.eval_steps=[{base['steps']}]",
        f"train.lr={base['lr']}",
        f"seed={base['seed']}",
        f"run.dir={run_dir}",
        "train.progress=false",
    ]


def cell_overrides(cell: dict, lr: float, seed: int, profile: str, run_dir: Path, base: Path | None) -> list[str]:
    overrides = [
        f"profile={profile}",
        "experiment=table2",
        f"adapter={cell['adapter']}",
        f"train.lr={lr}",
        f"seed={seed}",
        f"run.dir={run_dir}",
        "train.progress=false",
    ]
    for key in ("r", "alpha", "compression"):
        if key in cell:
            overrides.append(f"adapter.{key}={cell[key]}")
    if base is not None:
        overrides.append(f"model.pretrained={base}")
    return overrides


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def grid(profile: str) -> tuple[list[dict], dict | None]:
    """The cells of the profile and its base-model pretraining (None: the profile's model is the base)."""
    cfg = compose_cfg([f"profile={profile}", "experiment=table2"])
    return OmegaConf.to_container(cfg.grid[profile], resolve=True), OmegaConf.to_container(cfg.base)[profile]


def finished(run_dir: Path, overrides: list[str]) -> bool:
    """True when run_dir holds a finished run of exactly this config; a finished run of another config (the profile
    or grid changed since) stops the command rather than entering the table."""
    summary = run_dir / "summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("status") == "finished"):
        return False
    if config_hash(OmegaConf.load(run_dir / "config.yaml")) != config_hash(compose_cfg(overrides)):
        raise SystemExit(
            f"error: {run_dir} holds a finished run of a different config; delete it or pass --runs elsewhere"
        )
    return True


def run_one(overrides: list[str], threads: int) -> str:
    import torch

    from mora.training.run import run

    torch.set_num_threads(threads)
    summary = run(compose_cfg(overrides))
    return f"{summary['method']} lr={summary['lr']} seed={summary['seed']}: {summary['status']} ({summary['wall_s']} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", choices=PROFILES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (CPU profile)")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "table2")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "table2")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    root = args.runs / args.profile
    cells, base = grid(args.profile)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    base_dir = None
    if base is not None:
        base_dir = root / "base"
        overrides = base_overrides(base, args.profile, base_dir)
        if not finished(base_dir, overrides):
            print(f"table2 ({args.profile}): training the base model in {base_dir}", flush=True)
            print(run_one(overrides, os.cpu_count() or 1), flush=True)
        base_dir = base_dir / "adapter"
    todo: list[list[str]] = []
    for cell in cells:
        for lr in cell["lrs"]:
            for seed in args.seeds:
                run_dir = root / f"{cell['name']}-lr{lr:g}-s{seed}"
                overrides = cell_overrides(cell, lr, seed, args.profile, run_dir, base_dir)
                if not finished(run_dir, overrides):  # an unfinished run resumes from its last checkpoint
                    todo.append(overrides)
    print(f"table2 ({args.profile}): {len(todo)} runs to do in {root}", flush=True)
    if args.jobs == 1:
        for overrides in todo:
            print(run_one(overrides, threads), flush=True)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for line in pool.map(run_one, todo, [threads] * len(todo)):
                print(line, flush=True)
    paths = write_results(root, args.out, args.profile, cells)
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    sys.exit(main())
