"""UUID memorization (PAPER.md §2.6, Table 2): N random key -> value pairs of uuid4 strings.

Format: `<s>{key}:{value}</s>`; the loss is on `{value}</s>` only. Evaluation greedily generates the value given
`<s>{key}:` and scores character-level accuracy: for each pair, the fraction of the 36 value characters that the
generated string has at the same position (a short or missing generation scores 0 there), averaged over all pairs,
in percent. `exact` is the percentage of pairs generated exactly. `loss` is the mean cross-entropy (nats per token)
of the values and their </s> given the key, teacher-forced: it moves where greedy accuracy sits at a floor (a model
that has forgotten its pairs still writes UUID-shaped values: about 20% of characters right by their positions).

The tokenizer of a model built from config has one token per character: of the UUID alphabet (`task.alphabet:
uuid`, the default), or of printable ASCII (`ascii`: the UUID characters keep their ids, then the rest), for a
model that also learns text (the methods comparison's base, configs/task/uuid_text.yaml).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mora.config import TaskSettings, setting
from mora.evaluation.processes import partitioned, rank_world
from mora.tasks.data import IGNORE, Example, collate, epoch_batches

ALPHABET = "0123456789abcdef-:"
SEPARATOR = ":"
ALPHABETS = {
    "uuid": ALPHABET,
    "ascii": ALPHABET + "".join(c for c in string.printable if c not in ALPHABET and c not in "\r\x0b\x0c"),
}


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


def char_tokenizer(alphabet: str = "uuid") -> PreTrainedTokenizerFast:
    """One token per character, built offline: <pad>, <s>, </s>, <unk>, then 0-9 a-f - : (and, for `ascii`, the
    other printable ASCII characters, newline and tab among them); any other character is <unk>."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *ALPHABETS[alphabet]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encode(tokenizer: PreTrainedTokenizerBase, key: str, value: str) -> Example:
    prompt = [tokenizer.bos_token_id, *tokenizer(key + SEPARATOR, add_special_tokens=False).input_ids]
    target = [*tokenizer(value, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return Example(prompt + target, [IGNORE] * len(prompt) + target)


class Settings(TaskSettings):
    n_pairs: int = setting("a positive number of pairs, e.g. task.n_pairs=1000", gt=0)
    data_seed: int = setting("an integer, e.g. task.data_seed=0")
    alphabet: Literal["uuid", "ascii"] = setting("uuid or ascii (the tokenizer's characters)", default="uuid")


def build(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> UuidTask:
    return UuidTask(int(cfg["n_pairs"]), int(cfg["data_seed"]), tokenizer)


def tokenizer(cfg: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    return char_tokenizer(str(cfg.get("alphabet") or "uuid"))


class UuidTask:
    """The data recipe: pairs, their encoding, a seeded epoch order, and the accuracy metric."""

    name = "uuid"

    def __init__(self, n_pairs: int, data_seed: int, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pairs = generate_pairs(n_pairs, data_seed)
        self.tokenizer = tokenizer
        self.examples = [encode(tokenizer, k, v) for k, v in self.pairs]
        digest = hashlib.sha256(json.dumps([e.input_ids for e in self.examples]).encode())
        self.data_hash = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, start_step: int, batch: int, seed: int) -> Iterator[list[Example]]:
        return epoch_batches(len(self.examples), start_step, batch, seed, lambda idx: [self.examples[i] for i in idx])

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 256) -> dict[str, Any]:
        """Greedy generation of every value; character-level accuracy and exact match, in percent.

        `loss`: the values' teacher-forced cross-entropy (one forward per batch beside the generation). In a run of
        several processes each generates its share of the pairs (pairs[rank::world]) and the sums are reduced;
        every process runs the same number of batches (one with no pair left generates from <s> alone, uncounted)
        and, under ZeRO-3, every generation steps until all processes are done."""
        rank, world = rank_world()
        sync = world > 1 and partitioned(model)
        mine = self.pairs[rank::world]
        n_batches = math.ceil(math.ceil(len(self.pairs) / world) / batch_size)
        was_training = model.training
        model.eval()
        tok = self.tokenizer
        device = next(model.parameters()).device
        chars: list[float] = []
        exact: list[bool] = []
        loss, tokens = 0.0, 0
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            forward = value_loss(model, self.collate([encode(tok, k, v) for k, v in chunk or self.pairs[:1]]), device)
            if chunk:
                loss, tokens = loss + forward[0], tokens + forward[1]
            prompts = [[tok.bos_token_id, *tok(k + SEPARATOR, add_special_tokens=False).input_ids] for k, _ in chunk]
            targets = [v for _, v in chunk]
            if not chunk:  # this process's share ran out: a generation anyway (ZeRO-3), not counted
                prompts, targets = [[tok.bos_token_id]], [self.pairs[0][1]]
            max_new = max(len(tok(v, add_special_tokens=False).input_ids) for v in targets) + 1
            generated = greedy_generate(model, prompts, max_new, tok.pad_token_id, tok.eos_token_id, sync)
            if chunk:
                share, hit = pair_scores([tok.decode(out, skip_special_tokens=True) for out in generated], targets)
                chars += share
                exact += hit
        sums = torch.tensor([sum(chars), sum(exact), loss, tokens], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(sums)
        model.train(was_training)
        char_sum, exact_sum, loss_sum, token_sum = sums.tolist()
        return {
            "char_acc": 100.0 * char_sum / len(self.pairs),
            "exact": 100.0 * exact_sum / len(self.pairs),
            "loss": loss_sum / token_sum,
        }


def value_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, int]:
    """(sum of next-token cross-entropies over the label tokens, their count) of a collated batch of pairs."""
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)  # (batch, width - 1): the value and </s>, IGNORE elsewhere
    scored = labels != IGNORE  # only these rows of the logits in fp32 (a 32k vocabulary at Table 2's paper batch)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="sum")
    return float(loss), int(scored.sum())


def pair_scores(generated: list[str], values: list[str]) -> tuple[list[float], list[bool]]:
    """Per pair: the share of the value's characters that the generation has at the same position (missing
    characters count as wrong, extra ones are ignored; their mean over pairs, in percent, is `char_acc`), and
    whether it is exact."""
    if len(generated) != len(values) or not values:
        raise ValueError(f"need one generation per value, got {len(generated)} for {len(values)}")
    per_pair = [
        sum(a == b for a, b in zip(g, v, strict=False)) / len(v) for g, v in zip(generated, values, strict=True)
    ]
    exact = [g[: len(v)] == v for g, v in zip(generated, values, strict=True)]
    return per_pair, exact


def greedy_generate(
    model: torch.nn.Module, prompts: list[list[int]], max_new: int, pad_id: int, eos_id: int, sync: bool = False
) -> list[list[int]]:
    """Left-padded batched greedy decoding with a KV cache; stops each row at eos (sync: steps until every process
    is done, for weights partitioned across processes)."""
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
        synced_gpus=sync,
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
