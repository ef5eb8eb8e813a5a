"""Download everything a profile needs into the Hugging Face cache, on a networked machine, so that training nodes
run offline: the model and tokenizer, each task's training data, and the evaluation sets of the task's columns. A
streamed source (C4: a 305 GB split of which Table 3 reads 5.24 B tokens) is not downloaded whole: its recipe's
`prefetch(cfg)` streams and tokenises what the runs read into the data cache ($MORA_DATA_CACHE; copy it to the
nodes with the Hugging Face cache).

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
from mora.tasks import recipe
from mora.tasks.data import BUILTIN_SOURCES, LOCAL_BUILDERS

TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


def task_config(profile: str, task: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"profile={profile}", f"task={task}"])


def assets(
    profile: str, tasks: list[str]
) -> tuple[list[str], list[str], list[tuple[str, str | None, str | None]], list[str]]:
    """Of these tasks: the models, the tokenizers of tasks that name their own, the datasets (path, config, split;
    split None: every split) and the tasks whose recipe prefetches its own (streamed) data."""
    models: list[str] = []
    tokenizers: list[str] = []
    datasets: list[tuple[str, str | None, str | None]] = []
    streamed: list[str] = []
    known = columns()
    for task in tasks:
        cfg = task_config(profile, task)
        if cfg.model.pretrained and not cfg.task.get("from_scratch") and str(cfg.model.pretrained) not in models:
            models.append(str(cfg.model.pretrained))  # c4 builds its model from config: no weights to fetch
        if cfg.task.get("tokenizer") and str(cfg.task.tokenizer) not in tokenizers:
            tokenizers.append(str(cfg.task.tokenizer))
        source = cfg.task.get("source")
        if hasattr(recipe(cfg.task), "prefetch"):
            streamed.append(task)
        elif source is not None and source.path and source.path not in (*LOCAL_BUILDERS, *BUILTIN_SOURCES):
            datasets.append((str(source.path), source.get("name"), source.get("split")))
        evaluation = cfg.task.get("eval")
        if evaluation is None or not evaluation.get("columns") or evaluation.get("source") == "fixture":
            continue
        for name in evaluation.columns:
            for part in known[name].parts:
                datasets += [(*hub_dataset(b), None) for b in part.benchmarks]
    return models, tokenizers, list(dict.fromkeys(datasets)), streamed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--list", action="store_true", help="print the assets; download nothing")
    args = parser.parse_args()
    models, tokenizers, datasets, streamed = assets(args.profile, args.tasks)
    if args.list:
        lines = [*(f"model {m}" for m in models), *(f"tokenizer {t}" for t in tokenizers)]
        lines += [f"dataset {p} {n or ''}" for p, n, _ in datasets]
        print("\n".join([*lines, *(f"streamed {t} (tokenised into the data cache)" for t in streamed)]))
        return 0
    import datasets as hf_datasets
    from huggingface_hub import snapshot_download

    for model in models:
        path = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        print(f"{model} -> {path}", flush=True)
    for tokenizer in tokenizers:  # the tokenizer files only, not the model's weights
        path = snapshot_download(tokenizer, allow_patterns=["*.json", "*.model", "*.txt"])
        print(f"{tokenizer} (tokenizer) -> {path}", flush=True)
    for path, name, split in datasets:
        hf_datasets.load_dataset(path, name, split=split)
        print(f"{path} {name or ''} {split or '(all splits)'}: cached", flush=True)
    for task in streamed:
        cfg = task_config(args.profile, task)
        recipe(cfg.task).prefetch(cfg.task)
        print(f"{task}: streamed and tokenised into the data cache", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
