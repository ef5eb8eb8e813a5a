"""The tiny profile's text tokenizers: byte-level BPEs trained offline, deterministically: on the fixtures we ship
(training recipes and evaluation benchmarks), so that every fixture's text is covered by merges it has seen, or on a
pretraining corpus (the c4 recipe), as T5's tokenizer was trained on C4."""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mora.paths import REPO_ROOT

FIXTURE_DIRS = (REPO_ROOT / "mora" / "tasks" / "fixtures", REPO_ROOT / "mora" / "evaluation" / "fixtures")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def fixture_texts() -> list[str]:
    """Every string value of every fixture row (.jsonl) and every .txt fixture, in sorted file order."""
    texts: list[str] = []
    for folder in FIXTURE_DIRS:
        for path in sorted(folder.rglob("*")):
            if path.suffix == ".jsonl":
                texts += [s for line in path.read_text().splitlines() if line for s in _strings(json.loads(line))]
            elif path.suffix == ".txt":
                texts.append(path.read_text())
    return texts


@lru_cache(maxsize=4)
def fixture_bpe(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """The BPE of every fixture we ship (train_bpe)."""
    return train_bpe(fixture_texts(), vocab_size)


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown bytes) with <pad>, <s>, </s>, <unk>, prepending <s> when asked for special tokens
    (as LLaMA's tokenizer does); the same texts give the same tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])  # as LLaMA's
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
