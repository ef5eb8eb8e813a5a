"""Data recipes behind one interface (STYLE.md, "A task"): the engine never names a task.

A recipe is a module `mora/tasks/<recipe>.py` with

    build(cfg, tokenizer) -> Task          # cfg: the composed `task` config group
    tokenizer(cfg) -> PreTrainedTokenizer  # the tokenizer of a model built from config (no pretrained one)
    class Settings(TaskSettings): ...      # its config section's fields, types and ranges (mora.config)

and each `configs/task/<name>.yaml` names its recipe (`recipe: metamath`); several configs may share one recipe
(`biomed` and `finance` are both `recipe: cpt`). Adding a task is one module and one config.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from mora.config import check_task
from mora.tasks.data import Example
from mora.tasks.probes import SUBTASKS, Probed, named

NOT_RECIPES = {"corpus", "data", "probes", "prompts", "text", "tokenizer"}


class Task(Protocol):
    name: str
    data_hash: str  # content hash of the tokenised training data (raw data, recipe settings, tokenizer)

    def __len__(self) -> int: ...  # training examples (or packed blocks)

    def batches(self, start_step: int, global_batch: int, seed: int) -> Iterator[list[Example]]:
        """Global batches from update `start_step` on, a function of (seed, step) only."""
        ...

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
        """Headline metrics (floats, logged as eval/*); an optional "details" entry (JSON) is stored, not logged.
        Every process of a run calls it (ZeRO-3 needs them all for a forward); a process may return None, and the
        engine takes process 0's result."""
        ...


def recipes() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_RECIPES)


def recipe(cfg: Mapping[str, Any], where: str = "task"):
    name = cfg.get("recipe") or cfg.get("name")
    if name not in recipes():
        raise ValueError(f"unknown task recipe {name!r} ({where}.recipe); this engine has {', '.join(recipes())}")
    return importlib.import_module(f"mora.tasks.{name}")


def build_task(cfg: Mapping[str, Any], tokenizer: Any) -> Task:
    """The task of a section, with its probes (mora.tasks.probes) where it has any."""
    task = recipe(cfg).build(cfg, tokenizer)
    if not cfg.get("probes"):
        return task
    return Probed(task, {name: build_task(section, tokenizer) for name, section in named(cfg["probes"]).items()})


def check_sections(cfg: Mapping[str, Any], where: str = "task") -> None:
    """A task section against its recipe's Settings, and each of its sub-task sections (a mixture's parts, any
    task's probes) against theirs, naming the bad value by its full key (task.probes.text.block_size)."""
    check_task(cfg, recipe(cfg, where).Settings, where)
    for key in SUBTASKS:
        for name, section in named(cfg.get(key)).items():
            check_sections(section, f"{where}.{key}.{name}")


def task_tokenizer(cfg: Mapping[str, Any]) -> Any:
    return recipe(cfg).tokenizer(cfg)
