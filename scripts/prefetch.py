"""Download everything a profile needs into the Hugging Face cache, on a networked machine, so that training nodes
run offline: the model and tokenizer, each task's training data, and the evaluation sets of the task's columns.

    make prefetch PROFILE=paper                     # every task
    python scripts/prefetch.py --tasks metamath     # one task
    python scripts/prefetch.py --list               # print what would be downloaded, download nothing
"""

from __future__ import annotations

import argparse
import sys

from hydra import compose, initialize_config_dir

from mora.evaluation.columns import columns
from mora.evaluation.harness import hub_dataset
from mora.paths import CONFIG_DIR
from mora.tasks.data import LOCAL_BUILDERS

TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


def assets(profile: str, tasks: list[str]) -> tuple[list[str], list[tuple[str, str | None, str | None]]]:
    """The models and the datasets (path, config, split; split None: every split) of these tasks."""
    models: list[str] = []
    datasets: list[tuple[str, str | None, str | None]] = []
    known = columns()
    for task in tasks:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"profile={profile}", f"task={task}"])
        if cfg.model.pretrained and str(cfg.model.pretrained) not in models:
            models.append(str(cfg.model.pretrained))
        source = cfg.task.get("source")
        if source is not None and source.path and source.path not in LOCAL_BUILDERS:
            datasets.append((str(source.path), source.get("name"), source.get("split")))
        evaluation = cfg.task.get("eval")
        if evaluation is None or evaluation.source == "fixture":
            continue
        for name in evaluation.columns:
            for part in known[name].parts:
                datasets += [(*hub_dataset(b), None) for b in part.benchmarks]
    return models, list(dict.fromkeys(datasets))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--list", action="store_true", help="print the assets; download nothing")
    args = parser.parse_args()
    models, datasets = assets(args.profile, args.tasks)
    if args.list:
        print("\n".join([*(f"model {m}" for m in models), *(f"dataset {p} {n or ''}" for p, n, _ in datasets)]))
        return 0
    import datasets as hf_datasets
    from huggingface_hub import snapshot_download

    for model in models:
        path = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        print(f"{model} -> {path}", flush=True)
    for path, name, split in datasets:
        hf_datasets.load_dataset(path, name, split=split)
        print(f"{path} {name or ''} {split or '(all splits)'}: cached", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
