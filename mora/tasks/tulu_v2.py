"""Tülu v2 (Table 1, MMLU columns): `allenai/tulu-v2-sft-mixture` in open-instruct's message format (PAPER.md §2.4,
its `encode_with_messages_format`): each turn is `<|system|>\n`, `<|user|>\n` or `<|assistant|>\n`, its stripped
content and a newline, an assistant's content followed by eos; the text is stripped, tokenised once, and every
token outside the assistant turns carries no loss (each turn's bounds are the token counts of the text up to it, as
open-instruct computes them, so a merge across a boundary can shift a bound by one token). Sequences are cut at
`max_length` tokens (2048, `train.py`'s cutoff_len default: the authors' own value is not published); a
conversation with no assistant token left is dropped, as open-instruct does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mora.config import Source, TaskSettings, TextEval, setting
from mora.tasks.data import IGNORE, tokenised
from mora.tasks.text import TextTask
from mora.tasks.tokenizer import fixture_bpe

ROLES = ("system", "user", "assistant")


def concat(messages: list[dict[str, str]], eos: str) -> str:
    """open-instruct's text of a conversation (before the final strip)."""
    text = ""
    for message in messages:
        role, content = message["role"], message["content"].strip()
        if role not in ROLES:
            raise ValueError(f"tulu_v2: unknown message role {role!r}; open-instruct's format has {ROLES}")
        text += f"<|{role}|>\n{content}" + (eos if role == "assistant" else "") + "\n"
    return text


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    def length(text: str) -> int:  # tokens of a prefix, with <s>
        return 1 + len(tokenizer(text, add_special_tokens=False).input_ids)

    eos = tokenizer.eos_token
    ids = [tokenizer.bos_token_id, *tokenizer(concat(messages, eos).strip(), add_special_tokens=False).input_ids]
    ids = ids[:max_length]
    labels = list(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else length(concat(messages[:i], eos))
        head = concat(messages[: i + 1], eos)
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            head += "<|assistant|>\n"  # the next turn's marker carries no loss either
        end = length(head)
        labels[start:end] = [IGNORE] * len(labels[start:end])
    labels[0] = IGNORE  # <s>
    return ids, labels


class Settings(TaskSettings):
    source: Source
    max_length: int = setting("a number of tokens >= 2, e.g. task.max_length=512", ge=2)
    eval: TextEval


def build(cfg: Mapping[str, Any], tokenizer: Any) -> TextTask:
    max_length = int(cfg["max_length"])

    def prepare(raw: Any) -> Any:
        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            pairs = [encode(tokenizer, messages, max_length) for messages in batch["messages"]]
            return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}

        encoded = raw.map(encode_batch, batched=True, remove_columns=raw.column_names, desc="tulu_v2: tokenise")
        return encoded.filter(lambda labels: any(t != IGNORE for t in labels), input_columns="labels")

    recipe = {"recipe": "tulu_v2", "max_length": max_length}
    dataset, key = tokenised(cfg["source"], recipe, tokenizer, prepare, str(cfg["name"]))
    return TextTask(str(cfg["name"]), dataset, key, tokenizer, cfg["eval"])


def tokenizer(cfg: Mapping[str, Any]) -> Any:
    return fixture_bpe()
