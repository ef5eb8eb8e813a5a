"""UUID memorization (PAPER.md §2.6, Table 2): N random key -> value pairs of uuid4 strings.

Format: `<s>{key}:{value}</s>`; the loss is on `{value}</s>` only. Evaluation greedily generates the value given
`<s>{key}:` and scores character-level accuracy: for each pair, the fraction of the 36 value characters that the
generated string has at the same position (a short or missing generation scores 0 there), averaged over all pairs,
in percent. `exact` is the percentage of pairs generated exactly.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ALPHABET = "0123456789abcdef-:"
SEPARATOR = ":"


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (key, value) uuid4 strings from a seeded generator."""
    if n <= 0:
        raise ValueError(f"task.n_pairs must be positive, got {n}")
    rng = random.Random(seed)

    def draw() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    keys: dict[str, str] = {}
    while len(keys) < n:
        keys.setdefault(draw(), draw())
    return list(keys.items())


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UUID character, built offline: <pad>, <s>, </s>, <unk>, then 0-9 a-f - :."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer: PreTrainedTokenizerBase, key: str, value: str) -> Example:
    prompt = [tokenizer.bos_token_id, *tokenizer(key + SEPARATOR, add_special_tokens=False).input_ids]
    target = [*tokenizer(value, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return Example(prompt + target, [-100] * len(prompt) + target)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class UuidTask:
    """The data recipe: pairs, their encoding, a seeded epoch order, and the accuracy metric."""

    def __init__(self, n_pairs: int, data_seed: int, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pairs = generate_pairs(n_pairs, data_seed)
        self.tokenizer = tokenizer
        self.examples = [encode(tokenizer, k, v) for k, v in self.pairs]

    def __len__(self) -> int:
        return len(self.examples)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batches(self, start_step: int, batch: int, seed: int) -> Iterator[list[Example]]:
        """Global batches from update `start_step` on: epochs are reshuffled by (seed, epoch); a batch never
        spans two epochs (the last, smaller one of an epoch is dropped when N does not divide)."""
        per_epoch = len(self.examples) // batch
        if per_epoch == 0:
            raise ValueError(f"train.global_batch={batch} exceeds the {len(self.examples)} pairs of the task")
        step = start_step
        while True:
            epoch, index = divmod(step, per_epoch)
            order = self.epoch_order(epoch, seed)
            yield [self.examples[i] for i in order[index * batch : (index + 1) * batch]]
            step += 1

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 256) -> dict[str, float]:
        """Greedy generation of every value; character-level accuracy and exact match, in percent."""
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        texts: list[str] = []
        for start in range(0, len(self.pairs), batch_size):
            chunk = self.pairs[start : start + batch_size]
            prompts = [[tok.bos_token_id, *tok(k + SEPARATOR, add_special_tokens=False).input_ids] for k, _ in chunk]
            targets = [v for _, v in chunk]
            max_new = max(len(tok(v, add_special_tokens=False).input_ids) for v in targets) + 1
            generated = greedy_generate(model, prompts, max_new, tok.pad_token_id, tok.eos_token_id)
            texts += [tok.decode(out, skip_special_tokens=True) for out in generated]
        model.train(was_training)
        return char_accuracy(texts, [v for _, v in self.pairs])


def char_accuracy(generated: list[str], values: list[str]) -> dict[str, float]:
    """Character-level accuracy: per pair, the share of the value's characters that the generation has at the same
    position (missing characters count as wrong, extra ones are ignored), averaged over pairs; and exact match."""
    if len(generated) != len(values) or not values:
        raise ValueError(f"need one generation per value, got {len(generated)} for {len(values)}")
    per_pair = [
        sum(a == b for a, b in zip(g, v, strict=False)) / len(v) for g, v in zip(generated, values, strict=True)
    ]
    exact = [g[: len(v)] == v for g, v in zip(generated, values, strict=True)]
    return {"char_acc": 100.0 * sum(per_pair) / len(values), "exact": 100.0 * sum(exact) / len(values)}


def greedy_generate(
    model: torch.nn.Module, prompts: list[list[int]], max_new: int, pad_id: int, eos_id: int
) -> list[list[int]]:
    """Left-padded batched greedy decoding with a KV cache; stops each row at eos."""
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
