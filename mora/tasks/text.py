"""The task object of every text recipe: a tokenised `datasets.Dataset` (input_ids, labels), the seeded batch order,
and evaluation through lm-eval on the columns the task config names (`task.eval.columns`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mora.tasks.data import Example, collate, epoch_batches


class TextTask:
    def __init__(self, name: str, dataset: Any, data_hash: str, tokenizer: Any, eval_cfg: Mapping[str, Any]) -> None:
        if len(dataset) == 0:
            raise ValueError(f"task {name}: no training example is left after preprocessing; check task.source")
        self.name, self.dataset, self.data_hash = name, dataset, data_hash
        self.tokenizer, self.eval_cfg = tokenizer, eval_cfg
        if (eval_cfg.get("source") or "hub") == "hub":
            from mora.evaluation.columns import require_cached

            require_cached(list(eval_cfg["columns"]))  # before training, not after it

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, indices: list[int]) -> list[Example]:
        rows = self.dataset[indices]
        return [Example(ids, labels) for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)]

    def batches(self, start_step: int, global_batch: int, seed: int) -> Iterator[list[Example]]:
        return epoch_batches(len(self), start_step, global_batch, seed, self._fetch)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
        from mora.evaluation.columns import evaluate_columns

        e = self.eval_cfg
        return evaluate_columns(
            model,
            self.tokenizer,
            list(e["columns"]),
            source=str(e.get("source") or "hub"),
            batch_size=int(e.get("batch_size") or batch_size),
            limit=e.get("limit"),
            max_length=e.get("max_length"),
            gen_kwargs=e.get("gen_kwargs"),
        )
