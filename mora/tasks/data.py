"""What every data recipe shares: examples and their collation, the seeded batch order, loading a source (hub or
local files) with a one-line error when it is missing offline, and the tokenised-dataset cache keyed by a content
hash.

A source is a mapping {path, name, split, data_files}: `path` a hub id (`meta-math/MetaMathQA`) or a `datasets`
builder (`json`, `text`) with `data_files`; relative data_files resolve against the repository, so a config can
name the fixtures we ship.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mora.models import MissingAssetError
from mora.paths import REPO_ROOT, cache_root

IGNORE = -100
LOCAL_BUILDERS = ("json", "text", "csv", "parquet", "arrow")
BUILTIN_SOURCES = ("python_docs", "package_docs")  # corpora read from this machine's install: mora/tasks/corpus.py


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_batches(
    n: int, start_step: int, batch: int, seed: int, fetch: Callable[[list[int]], list[Example]]
) -> Iterator[list[Example]]:
    """Global batches from update `start_step` on, a function of (seed, step): epochs are reshuffled by
    (seed, epoch); a batch never spans two epochs (the last, smaller one of an epoch is dropped)."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"train.global_batch={batch} exceeds the {n} training examples of the task")
    step, epoch, order = start_step, -1, []
    while True:
        index = step % per_epoch
        if step // per_epoch != epoch:  # one permutation per epoch, not per step (326k examples for Tulu v2)
            epoch = step // per_epoch
            order = epoch_order(n, epoch, seed)
        yield fetch(order[index * batch : (index + 1) * batch])
        step += 1


def _resolve(files: Any) -> Any:
    """data_files with repository-relative paths made absolute (str, list, or {split: str | list})."""
    if isinstance(files, Mapping):
        return {k: _resolve(v) for k, v in files.items()}
    if isinstance(files, str):
        path = Path(files)
        return str(path if path.is_absolute() else REPO_ROOT / path)
    return [_resolve(f) for f in files]


def _files(files: Any) -> list[Path]:
    if isinstance(files, Mapping):
        return [p for v in files.values() for p in _files(v)]
    if isinstance(files, str):
        return [Path(files)]
    return [Path(f) for f in files]


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def load_source(source: Mapping[str, Any], what: str, streaming: bool = False):
    """The `datasets.Dataset` of a source's split (an `IterableDataset` when streaming). A local file that is
    missing, or a hub dataset that is not cached while offline, stops with one line naming it and the fix."""
    import datasets

    path, split = source.get("path"), source.get("split") or "train"
    if not path:
        raise ValueError(f"{what}: task.source.path is not set; name a hub dataset or a builder (json, text)")
    if path in BUILTIN_SOURCES:
        from mora.tasks.corpus import corpus_split

        raw = datasets.Dataset.from_list(corpus_split(path, split))
        return raw.to_iterable_dataset() if streaming else raw
    if path in LOCAL_BUILDERS:
        files = _resolve(source.get("data_files"))
        if not files:
            raise ValueError(f"{what}: task.source.data_files is empty; name the local {path} files to read")
        missing = [str(p) for p in _files(files) if not p.is_file()]
        if missing:
            raise ValueError(f"{what}: data file {missing[0]} does not exist; fix task.source.data_files")
        return datasets.load_dataset(path, data_files=files, split=split, streaming=streaming)
    try:
        return datasets.load_dataset(str(path), source.get("name"), split=split, streaming=streaming)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        if _offline() or "offline" in str(error).lower():
            raise MissingAssetError(
                f"dataset {path!r} ({what}) is not in the local Hugging Face cache and this machine is offline: on "
                "a networked machine run `make prefetch PROFILE=paper`, or point task.source at local files"
            ) from None
        raise


def source_fingerprint(source: Mapping[str, Any], raw: Any) -> str:
    """What identifies the raw data: the bytes of local files; for a hub dataset, the fingerprint `datasets` gives
    a loaded split: a hash of its relative cache folder name/config/version/<hash of the revision's data files>
    and the split, the same on every machine that cached the same revision."""
    h = hashlib.sha256()
    if source.get("path") in BUILTIN_SOURCES:
        from mora.tasks.corpus import corpus_split

        h.update(json.dumps(corpus_split(source["path"], source.get("split") or "train")).encode())
    elif source.get("path") in LOCAL_BUILDERS:
        for path in sorted(_files(_resolve(source.get("data_files")))):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    else:  # a streamed hub split has no fingerprint: its name stands for it
        fingerprint = getattr(raw, "_fingerprint", None)
        h.update(json.dumps([source.get("path"), source.get("name"), source.get("split"), fingerprint]).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_folder(key_parts: Mapping[str, Any], what: str) -> tuple[Path, str]:
    """Where `cached` keeps the dataset of key_parts (built when it holds dataset_info.json), and its hash."""
    key = hashlib.sha256(json.dumps(dict(key_parts), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / f"{what}-{key}", key


def cached(key_parts: Mapping[str, Any], what: str, build: Callable[[], Any]) -> tuple[Any, str]:
    """The dataset `build()` makes, built once and kept on disk under a content hash of key_parts; returns
    (dataset, hash). Built in a temporary folder and renamed, so a killed build leaves no half-written cache."""
    import datasets

    folder, key = cache_folder(key_parts, what)
    if not (folder / "dataset_info.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        build().save_to_disk(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:  # another process (a rank of the same run) built it meanwhile
            shutil.rmtree(tmp)
    return datasets.load_from_disk(str(folder)), key


def tokenised(
    source: Mapping[str, Any],
    recipe: Mapping[str, Any],
    tokenizer: Any,
    build: Callable[[Any], Any],
    what: str,
):
    """The tokenised dataset of a recipe, built once with `build(raw) -> Dataset` (datasets' batched map) and kept
    on disk under a content hash of (raw data, recipe settings, tokenizer); returns (dataset, hash)."""
    raw = load_source(source, what)
    parts = {
        "raw": source_fingerprint(source, raw),
        "recipe": dict(recipe),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return cached(parts, what, lambda: build(raw))
