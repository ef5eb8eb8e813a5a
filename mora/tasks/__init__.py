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

from mora.tasks.data import Example

NOT_RECIPES = {"corpus", "data", "prompts", "text", "tokenizer"}


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


def recipe(cfg: Mapping[str, Any]):
    name = cfg.get("recipe") or cfg.get("name")
    if name not in recipes():
        raise ValueError(f"unknown task recipe {name!r} (task.recipe); this engine has {', '.join(recipes())}")
    return importlib.import_module(f"mora.tasks.{name}")


def build_task(cfg: Mapping[str, Any], tokenizer: Any) -> Task:
    return recipe(cfg).build(cfg, tokenizer)


def task_tokenizer(cfg: Mapping[str, Any]) -> Any:
    return recipe(cfg).tokenizer(cfg)
