"""Tasks inside a task: the named sub-tasks of a section (a mixture's `parts`, any task's `probes`), their scores
under their names, and probes: tasks a run evaluates but does not train on.

A probe says what training cost: scored on the model a run starts from and on the model it ends with, the change is
forgetting (the methods comparison probes what its base model was trained on). `task.probes` maps a name to a task
section of any recipe, e.g.

    task.probes.text: {recipe: c4, source: {path: python_docs, split: train}, eval_source: ..., block_size: 128}

built with the run's tokenizer; its metrics are logged as eval/<name>/<metric> beside the task's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mora.tasks.data import Example

SUBTASKS = ("parts", "probes")  # the keys of a task section that hold named task sections


def named(sections: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each sub-task section as a plain dict, named by its key where it names itself nothing."""
    from omegaconf import DictConfig, OmegaConf

    out = {}
    for name, section in (sections or {}).items():
        plain = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        out[str(name)] = {"name": str(name), **plain}
    return out


def evaluate_named(tasks: Mapping[str, Any], model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
    """Every task's headline metrics as <name>/<metric>, their details under their names (None where every task
    returned None: a process other than 0 of an lm-eval task)."""
    scores: dict[str, Any] = {}
    details: dict[str, Any] = {}
    answered = False
    for name, task in tasks.items():
        metrics = task.evaluate(model, batch_size)
        if metrics is None:
            continue
        answered = True
        metrics = dict(metrics)
        if "details" in metrics:
            details[name] = metrics.pop("details")
        scores.update({f"{name}/{key}": value for key, value in metrics.items()})
    if not answered:
        return None
    return {**scores, **({"details": details} if details else {})}


class Probed:
    """A task trained as it is and evaluated together with its probes; the training data (and its hash) are the
    task's alone."""

    def __init__(self, task: Any, probes: Mapping[str, Any]) -> None:
        self.task, self.probes = task, dict(probes)
        self.name, self.data_hash = task.name, task.data_hash

    def __len__(self) -> int:
        return len(self.task)

    def batches(self, start_step: int, global_batch: int, seed: int) -> Iterator[list[Example]]:
        return self.task.batches(start_step, global_batch, seed)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return self.task.collate(examples)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
        own = self.task.evaluate(model, batch_size)
        probed = evaluate_named(self.probes, model, batch_size)
        if own is None and probed is None:
            return None
        own, probed = dict(own or {}), dict(probed or {})
        details = {k: v for k, v in (("task", own.pop("details", None)), ("probes", probed.pop("details", None))) if v}
        return {**own, **probed, **({"details": details} if details else {})}
