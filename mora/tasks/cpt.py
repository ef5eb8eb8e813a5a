"""Continual pretraining (Table 1, BioMed. and Finance columns): domain text, tokenised and packed into blocks of
`block_size` tokens (PAPER.md §2.3–2.4: AdaptLLM's reading-comprehension texts; 2048 tokens is inferred from the
author's 1.3B tokens over 5000 steps of 128). Every document is `<s> text </s>`; documents are concatenated in
order and cut into full blocks (the remainder is dropped); the loss is on every token.

The source is any `datasets` source with a text column (`task.text_column`): a hub dataset, or local .jsonl / .txt
files (`task.source={path: text, data_files: [...]}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mora.config import Source, TaskSettings, TextEval, setting
from mora.tasks.data import tokenised
from mora.tasks.text import TextTask
from mora.tasks.tokenizer import fixture_bpe


def pack(documents: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut them into full blocks of block_size (the tail is dropped)."""
    stream = [t for doc in documents for t in doc]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


class Settings(TaskSettings):
    source: Source
    text_column: str = setting("the source's text column, e.g. task.text_column=text", min_length=1)
    block_size: int = setting("a number of tokens >= 2, e.g. task.block_size=2048", ge=2)
    eval: TextEval


def build(cfg: Mapping[str, Any], tokenizer: Any) -> TextTask:
    block_size, column = int(cfg["block_size"]), str(cfg.get("text_column") or "text")

    def prepare(raw: Any) -> Any:
        if column not in raw.column_names:
            raise ValueError(
                f"task {cfg['name']}: the source has no column {column!r} ({raw.column_names}); set task.text_column"
            )

        def pack_batch(batch: dict[str, list]) -> dict[str, list]:
            docs = tokenizer(batch[column], add_special_tokens=False).input_ids
            blocks = pack([[tokenizer.bos_token_id, *d, tokenizer.eos_token_id] for d in docs], block_size)
            return {"input_ids": blocks, "labels": blocks}

        # packed within each map batch (1,000 documents): a block never spans two batches, each batch drops its tail
        return raw.map(pack_batch, batched=True, remove_columns=raw.column_names, desc=f"{cfg['name']}: pack")

    recipe = {"recipe": "cpt", "block_size": block_size, "text_column": column}
    dataset, key = tokenised(cfg["source"], recipe, tokenizer, prepare, str(cfg["name"]))
    return TextTask(str(cfg["name"]), dataset, key, tokenizer, cfg["eval"])


def tokenizer(cfg: Mapping[str, Any]) -> Any:
    return fixture_bpe()
