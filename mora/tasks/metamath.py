"""MetaMath (Table 1, GSM8K and MATH columns): `meta-math/MetaMathQA` with the authors' Alpaca prompt (PAPER.md
§2.4, their `training_utils.py`): the first line of `query` is the instruction, the rest the input; the target is
`response + eos`; prompt tokens carry no loss; sequences are cut at `max_length` (512) tokens.

As the authors: the whole text (prompt + response) is tokenised once and the first len(tokens of the prompt)
positions are masked (a SentencePiece tokenizer would give a separately tokenised response a leading "▁"), then
eos is appended. An example whose response is cut away entirely is dropped (it would carry no loss).
`max_examples` keeps the authors' cap (1,000,000; MetaMathQA has 395k).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mora.config import Source, TaskSettings, TextEval, setting
from mora.prompts import alpaca_prompt
from mora.tasks.data import IGNORE, tokenised
from mora.tasks.text import TextTask
from mora.tasks.tokenizer import fixture_bpe


def encode(tokenizer: Any, query: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt = alpaca_prompt(query)
    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False).input_ids)  # with <s>
    ids = [tokenizer.bos_token_id, *tokenizer(prompt + response, add_special_tokens=False).input_ids]
    ids = [*ids, tokenizer.eos_token_id][:max_length]
    labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
    return ids, labels


class Settings(TaskSettings):
    source: Source
    max_length: int = setting("a number of tokens >= 2, e.g. task.max_length=512", ge=2)
    max_examples: int | None = setting(default=None, hint="a positive number, or null (all)", gt=0)
    eval: TextEval


def build(cfg: Mapping[str, Any], tokenizer: Any) -> TextTask:
    max_length, cap = int(cfg["max_length"]), cfg.get("max_examples")

    def prepare(raw: Any) -> Any:
        if cap is not None and len(raw) > cap:
            raw = raw.select(range(int(cap)))

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            pairs = [
                encode(tokenizer, q, r, max_length) for q, r in zip(batch["query"], batch["response"], strict=True)
            ]
            return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}

        encoded = raw.map(encode_batch, batched=True, remove_columns=raw.column_names, desc="metamath: tokenise")
        return encoded.filter(lambda labels: any(t != IGNORE for t in labels), input_columns="labels")

    recipe = {"recipe": "metamath", "max_length": max_length, "max_examples": cap}
    dataset, key = tokenised(cfg["source"], recipe, tokenizer, prepare, str(cfg["name"]))
    return TextTask(str(cfg["name"]), dataset, key, tokenizer, cfg["eval"])


def tokenizer(cfg: Mapping[str, Any]) -> Any:
    return fixture_bpe()
