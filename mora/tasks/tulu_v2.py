"""Tülu v2 (Table 1, MMLU columns): `allenai/tulu-v2-sft-mixture` in open-instruct's message format (PAPER.md §2.4):
each turn is `<|system|>\n`, `<|user|>\n` or `<|assistant|>\n` followed by its stripped content and a newline, an
assistant turn ending in eos; the loss is on the assistant turns' content and their eos only; sequences are cut at
`max_length` tokens (2048, `train.py`'s cutoff_len default: the authors' own value is not published).

Each piece is tokenised on its own and the pieces concatenated (open-instruct tokenises the whole text and masks by
prefix lengths, which can differ by a merge at a boundary, and also trains the newline after an assistant's eos).
A conversation with no assistant token left after the cut is dropped, as open-instruct does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mora.tasks.data import IGNORE, tokenised
from mora.tasks.text import TextTask
from mora.tasks.tokenizer import fixture_bpe

ROLES = ("system", "user", "assistant")


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"].strip()
        if role not in ROLES:
            raise ValueError(f"tulu_v2: unknown message role {role!r}; open-instruct's format has {ROLES}")
        last = i == len(messages) - 1
        if role == "assistant":
            head, body = tok("<|assistant|>\n"), [*tok(content), tokenizer.eos_token_id]
            tail = [] if last else tok("\n")
            ids += head + body + tail
            labels += [IGNORE] * len(head) + body + [IGNORE] * len(tail)
        else:
            piece = tok(f"<|{role}|>\n{content}" + ("" if last else "\n"))
            ids += piece
            labels += [IGNORE] * len(piece)
    return ids[:max_length], labels[:max_length]


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
