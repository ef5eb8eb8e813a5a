"""Pretraining from scratch on C4 (Table 3, PAPER.md §2.5): documents streamed, tokenised and packed into blocks of
`block_size` tokens (512 in the paper), every token a label; perplexity on a fixed held-out set of blocks.

Tokenisation follows ReLoRA's `pretokenize.py`, which the authors say they used: each document is
`tokenizer(text + eos_token)` with the tokenizer's own special tokens. The authors' model configs (vocab 32100,
bos/eos 0/1) are those of T5's tokenizer (`t5-base`, ReLoRA's default): its post-processor appends `</s>` itself,
so each document ends in two `</s>` there, as in ReLoRA's data (read from the code; the tiny profile's BPE instead
prepends `<s>` and ends with one `</s>`). Documents are concatenated in stream order and cut into full blocks; a
block may span documents, no token is lost or repeated, only the tail after the last full block is dropped.

The source is streamed (C4's `en` train split is 305 GB; Table 3 reads 10k steps x 1024 x 512 = 5.24 B tokens of
it): the first `train_tokens` tokens' blocks are written once to the data cache (int32, 21 GB for the paper) by
`make prefetch PROFILE=paper TASKS=c4` (or by a first run in one process: in several, the other processes would
time out waiting for it, so a multi-process run refuses to start without it), and training shuffles those blocks
by (seed, epoch). The validation set is the first `eval.tokens` tokens of `eval_source` (C4's validation split:
10 M tokens, ReLoRA's `target_eval_tokens`), packed the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from pydantic import StrictBool

from mora.config import Section, Source, TaskSettings, setting
from mora.evaluation.perplexity import perplexity
from mora.models import MissingAssetError, ensure_local
from mora.tasks.data import (
    BUILTIN_SOURCES,
    LOCAL_BUILDERS,
    Example,
    cache_folder,
    cache_root,
    cached,
    collate,
    epoch_batches,
    load_source,
    source_fingerprint,
    tokenizer_fingerprint,
)
from mora.tasks.tokenizer import train_bpe

DOCUMENTS_PER_BATCH = 1000


def pack_stream(documents: Iterable[list[int]], block_size: int) -> Iterator[list[int]]:
    """Concatenate the documents' tokens in order and cut the stream into full blocks of block_size."""
    if block_size <= 1:
        raise ValueError(f"task.block_size must be at least 2 tokens, got {block_size}")
    buffer: list[int] = []
    for document in documents:
        buffer += document
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[:block_size]


def document_tokens(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """As ReLoRA's pretokenize.py: each text + eos_token, with the tokenizer's own special tokens."""
    return tokenizer([text + tokenizer.eos_token for text in texts]).input_ids


def stream_texts(raw: Any, column: str, what: str) -> Iterator[list[str]]:
    """The text column of a (streamed) split, DOCUMENTS_PER_BATCH documents at a time."""
    for batch in raw.iter(batch_size=DOCUMENTS_PER_BATCH):
        if column not in batch:
            raise ValueError(f"{what}: the source has no column {column!r} ({list(batch)}); set task.text_column")
        yield batch[column]


def stream_blocks(raw: Any, column: str, tokenizer: Any, block_size: int, max_blocks: int | None, what: str):
    """{"input_ids": block} for the first max_blocks blocks (None: all) of a streamed split."""
    documents = (doc for texts in stream_texts(raw, column, what) for doc in document_tokens(texts, tokenizer))
    for i, block in enumerate(pack_stream(documents, block_size)):
        if max_blocks is not None and i >= max_blocks:
            return
        yield {"input_ids": block}


def blocks(
    source: Mapping[str, Any], column: str, tokenizer: Any, block_size: int, tokens: int | None, what: str
) -> tuple[Any, str]:
    """The packed blocks of a source's first `tokens` tokens (None: all), built once into the data cache."""
    import datasets

    max_blocks = None if tokens is None else int(tokens) // block_size
    parts = {
        "raw": source_fingerprint(source, None),  # a streamed hub split: its path, config and split
        "recipe": {"recipe": "c4", "block_size": block_size, "text_column": column, "max_blocks": max_blocks},
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    generator_cache = cache_root() / f".generator-{os.getpid()}"  # datasets' own cache of the build, per process
    folder, _ = cache_folder(parts, what)
    hub = source.get("path") not in (*LOCAL_BUILDERS, *BUILTIN_SOURCES)
    if hub and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (folder / "dataset_info.json").is_file():
        raise MissingAssetError(
            f"{what}: the tokenised blocks of {source.get('path')} are not in the data cache ({cache_root()}); "
            "streaming and tokenising them takes one process hours while the others would time out: run "
            f"`make prefetch PROFILE=paper TASKS={what.split('-')[0]}` (or one process) first"
        )

    def build() -> Any:
        raw = load_source(source, what, streaming=True)
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
        return datasets.Dataset.from_generator(
            stream_blocks,
            features=features,
            cache_dir=str(generator_cache),
            gen_kwargs={
                "raw": raw,
                "column": column,
                "tokenizer": tokenizer,
                "block_size": block_size,
                "max_blocks": max_blocks,
                "what": what,
            },
        )

    dataset, key = cached(parts, what, build)
    shutil.rmtree(generator_cache, ignore_errors=True)
    if len(dataset) == 0:
        raise ValueError(
            f"{what}: no block of {block_size} tokens: the source is shorter than that, or task.train_tokens / "
            f"task.eval.tokens={tokens} is below task.block_size"
        )
    return dataset, key


class PretrainTask:
    """Packed blocks, every token a label; evaluate() is perplexity on the held-out blocks."""

    def __init__(self, name: str, train: Any, valid: Any, data_hash: str, tokenizer: Any, batch_size: int | None):
        self.name, self.train, self.data_hash, self.tokenizer = name, train, data_hash, tokenizer
        self.valid = torch.tensor(valid["input_ids"], dtype=torch.long)
        self.eval_batch = batch_size

    def __len__(self) -> int:
        return len(self.train)

    def _fetch(self, indices: list[int]) -> list[Example]:
        return [Example(ids, ids) for ids in self.train[indices]["input_ids"]]

    def batches(self, start_step: int, global_batch: int, seed: int) -> Iterator[list[Example]]:
        return epoch_batches(len(self), start_step, global_batch, seed, self._fetch)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        return perplexity(model, self.valid, self.eval_batch or batch_size)


class Evaluation(Section):
    tokens: int | None = setting(default=None, hint="a positive number of validation tokens, or null (all)", gt=0)
    batch_size: int | None = setting(default=None, hint="a positive number of blocks per forward", gt=0)


class Settings(TaskSettings):
    from_scratch: StrictBool = setting("true or false")
    source: Source
    eval_source: Source
    text_column: str = setting("the source's text column, e.g. task.text_column=text", min_length=1)
    block_size: int = setting("a number of tokens >= 2, e.g. task.block_size=512", ge=2)
    train_tokens: int | None = setting(default=None, hint="a positive number of tokens, or null (all)", gt=0)
    tokenizer: str | None = setting(default=None, hint="a hub id or a local folder, or null (a BPE trained here)")
    vocab_size: int | None = setting(default=None, hint="a positive vocabulary size, or null", gt=0)
    eval: Evaluation


def build(cfg: Mapping[str, Any], tokenizer: Any) -> PretrainTask:
    name, block_size, column = str(cfg["name"]), int(cfg["block_size"]), str(cfg.get("text_column") or "text")
    train, train_key = blocks(cfg["source"], column, tokenizer, block_size, cfg.get("train_tokens"), name)
    valid, valid_key = blocks(
        cfg["eval_source"], column, tokenizer, block_size, cfg["eval"].get("tokens"), f"{name}-validation"
    )
    return PretrainTask(name, train, valid, f"{train_key}+{valid_key}", tokenizer, cfg["eval"].get("batch_size"))


@lru_cache(maxsize=2)
def _corpus_bpe(source_json: str, column: str, vocab_size: int) -> Any:
    raw = load_source(json.loads(source_json), "tokenizer corpus")
    return train_bpe(list(raw[column]), vocab_size)


def tokenizer(cfg: Mapping[str, Any]) -> Any:
    """`task.tokenizer` (a hub id or local folder, e.g. t5-base), or, when null, a byte-level BPE of
    `task.vocab_size` trained on the training split (a local source)."""
    from transformers import AutoTokenizer

    if cfg.get("tokenizer"):
        return AutoTokenizer.from_pretrained(ensure_local(str(cfg["tokenizer"]), "tokenizer", "task.tokenizer"))
    source = json.dumps(dict(cfg["source"]), sort_keys=True, default=str)
    return _corpus_bpe(source, str(cfg.get("text_column") or "text"), int(cfg.get("vocab_size") or 2048))


def prefetch(cfg: Mapping[str, Any]) -> None:
    """On a networked machine: stream, tokenise and cache the training and validation blocks (make prefetch)."""
    build(cfg, tokenizer(cfg))
