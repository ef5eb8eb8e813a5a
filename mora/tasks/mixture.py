"""Several tasks trained as one (configs/task/uuid_text.yaml: UUID pairs and text, the methods comparison's base).

`task.parts` maps a name to a task section of any recipe; `task.shares` gives each part's share of every global
batch (relative weights: {pairs: 1, text: 1} halves it, the remainder going to the largest fractions). Each part
draws its share from its own seeded batch order, so a batch is a function of (seed, step) as every task's is. The
parts are built with one tokenizer, the first part's, and evaluated each as it would be alone: their metrics are
<part>/<metric>.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from mora.config import TaskSettings, setting
from mora.tasks import build_task, recipe
from mora.tasks.data import Example, collate
from mora.tasks.probes import evaluate_named, named


class Settings(TaskSettings):
    parts: dict[str, dict[str, Any]] = setting(
        "a mapping of part names to task sections, e.g. '{pairs: {recipe: uuid, n_pairs: 64, data_seed: 0}}'",
        min_length=1,
    )
    shares: dict[str, Annotated[float, Field(gt=0)]] = setting("a positive weight per part, e.g. '{pairs: 1, text: 1}'")

    @field_validator("shares")
    @classmethod
    def _one_per_part(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        parts = list(info.data.get("parts") or {})
        if sorted(value) != sorted(parts):
            raise ValueError(f"the parts are {', '.join(parts)}: one weight each")
        return value


def split(global_batch: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Examples per part in a global batch: proportional to the shares, rounded by largest remainder, one at least."""
    if global_batch < len(shares):
        raise ValueError(f"train.global_batch={global_batch} is below the {len(shares)} parts of the mixture")
    total = sum(shares.values())
    exact = {name: global_batch * w / total for name, w in shares.items()}
    counts = {name: max(1, int(x)) for name, x in exact.items()}
    by_remainder = sorted(shares, key=lambda n: exact[n] - int(exact[n]), reverse=True)
    while sum(counts.values()) < global_batch:
        counts[by_remainder.pop(0)] += 1
    while sum(counts.values()) > global_batch:  # the one-at-least floor took too many: from the largest part
        counts[max(counts, key=counts.get)] -= 1
    return counts


class MixtureTask:
    """The parts' batches side by side (each part's share of a global batch), their evaluations by name."""

    def __init__(self, name: str, parts: Mapping[str, Any], shares: Mapping[str, float], tokenizer: Any) -> None:
        self.name, self.parts, self.shares, self.tokenizer = name, dict(parts), dict(shares), tokenizer
        hashes = [[n, part.data_hash, self.shares[n]] for n, part in self.parts.items()]
        self.data_hash = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def batches(self, start_step: int, global_batch: int, seed: int) -> Iterator[list[Example]]:
        counts = split(global_batch, self.shares)
        streams = [part.batches(start_step, counts[n], seed) for n, part in self.parts.items()]
        while True:
            yield [example for stream in streams for example in next(stream)]

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
        return evaluate_named(self.parts, model, batch_size)


def tokenizer(cfg: Mapping[str, Any]) -> Any:
    first = next(iter(named(cfg["parts"]).values()))
    return recipe(first).tokenizer(first)


def build(cfg: Mapping[str, Any], tokenizer: Any) -> MixtureTask:
    parts = {name: build_task(section, tokenizer) for name, section in named(cfg["parts"]).items()}
    return MixtureTask(str(cfg["name"]), parts, dict(cfg["shares"]), tokenizer)
