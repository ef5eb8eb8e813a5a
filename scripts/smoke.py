"""Smoke run: every adapter method of the paper on every task of the engine for a few steps on the tiny profile, then
a check that each run folder is complete (config.yaml, env.json, metrics.jsonl, adapter/, summary.json finished). The
other methods PEFT ships (configs/adapter with method peft): tests/test_peft_methods.py.

    python scripts/smoke.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from mora.adapters.build import PAPER_METHODS
from mora.paths import CONFIG_DIR
from mora.training.run import run

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "summary.json")
TASKS = tuple(sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")))


def smoke_overrides(method: str, task: str, steps: int, run_dir: Path) -> list[str]:
    overrides = [
        f"adapter={method}",
        f"task={task}",
        "train.epochs=null",
        f"train.steps={steps}",
        f"train.eval_steps=[{steps}]",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.log_every=1",
        "train.progress=false",
        f"run.dir={run_dir}",
    ]
    if task == "uuid":
        overrides += ["task.n_pairs=16"]
    elif task == "c4":  # 64 training blocks, 8 held out
        overrides += ["task.train_tokens=8192", "task.eval.tokens=1024"]
    elif task == "uuid_text":  # a mixture: each part's own sizes
        overrides += ["task.parts.pairs.n_pairs=16", "task.parts.text.eval.tokens=1024"]
    else:  # two documents per benchmark, short generations: the whole evaluation pipeline, quickly
        overrides += ["task.eval.limit=2", "task.eval.gen_kwargs={max_gen_toks:16}"]
    if method in ("relora", "remora"):
        overrides += ["adapter.restart.every=2", "adapter.restart.warmup=1"]
    if method == "remora":
        overrides += ["adapter.r=2"]
    return overrides


def check_run_folder(path: Path) -> list[str]:
    """What is missing or wrong in a run folder (empty when complete)."""
    problems = [f"{name} missing" for name in RUN_FILES if not (path / name).is_file()]
    if not (path / "adapter").is_dir() or not any((path / "adapter").iterdir()):
        problems.append("adapter/ missing or empty")
    if (path / "summary.json").is_file() and json.loads((path / "summary.json").read_text())["status"] != "finished":
        problems.append("summary.json status is not finished")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for task in TASKS:
            for method in PAPER_METHODS:
                folder = Path(tmp) / f"{task}-{method}"
                run(compose(config_name="train", overrides=smoke_overrides(method, task, args.steps, folder)))
                problems = check_run_folder(folder)
                failed += bool(problems)
                print(f"{task:9s} {method:9s} {'ok' if not problems else '; '.join(problems)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
