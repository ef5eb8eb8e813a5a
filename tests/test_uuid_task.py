"""The UUID data recipe and its metric."""

import math
import re

import pytest
import torch

from mora.tasks.data import collate
from mora.tasks.uuid import UuidTask, char_tokenizer, encode, generate_pairs, pair_scores
from tests.conftest import small_llama

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_pairs_are_seeded_distinct_uuid4():
    pairs = generate_pairs(200, seed=3)
    assert pairs == generate_pairs(200, seed=3) and pairs != generate_pairs(200, seed=4)
    assert len({k for k, _ in pairs}) == 200
    assert all(UUID4.match(k) and UUID4.match(v) for k, v in pairs)
    with pytest.raises(ValueError, match="n_pairs must be positive"):
        generate_pairs(0, seed=0)


def test_loss_is_on_the_value_only():
    tok = char_tokenizer()
    key, value = generate_pairs(1, seed=0)[0]
    example = encode(tok, key, value)
    prompt_len = 1 + len(key) + 1  # <s> key :
    assert example.labels[:prompt_len] == [-100] * prompt_len
    assert tok.decode(example.labels[prompt_len:-1]) == value and example.labels[-1] == tok.eos_token_id
    batch = collate([example, encode(tok, key[:10], value)], tok.pad_token_id)
    assert batch["attention_mask"][1].sum() == len(encode(tok, key[:10], value).input_ids)
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()


def test_char_accuracy_definition():
    # per pair: the share of the value's characters at the same position (missing ones wrong, extra ones ignored)
    values = ["abcd", "abcd"]
    assert pair_scores(["abcd", "abcd"], values) == ([1.0, 1.0], [True, True])  # char_acc 100, exact 100
    assert pair_scores(["abxd", ""], values) == ([0.75, 0.0], [False, False])  # char_acc 37.5, exact 0
    assert pair_scores(["abcdzz", "ab"], values)[0] == [1.0, 0.5]  # char_acc 75
    with pytest.raises(ValueError, match="one generation per value"):
        pair_scores(["a"], values)


def test_epoch_order_and_batches_are_deterministic():
    task = UuidTask(10, 0, char_tokenizer())
    a = [[e.input_ids for e in b] for b, _ in zip(task.batches(0, 4, seed=1), range(5), strict=False)]
    b = [[e.input_ids for e in b] for b, _ in zip(task.batches(0, 4, seed=1), range(5), strict=False)]
    resumed = [[e.input_ids for e in b] for b, _ in zip(task.batches(3, 4, seed=1), range(2), strict=False)]
    assert a == b and resumed == a[3:5]
    with pytest.raises(ValueError, match="exceeds the 10 training examples"):
        next(task.batches(0, 11, seed=0))


def test_evaluate_scores_a_model_that_knows_the_answers():
    tok = char_tokenizer()
    task = UuidTask(3, 0, tok)
    answers = {tuple(e.input_ids[:38]): e.input_ids[38:] for e in task.examples}

    class Oracle(torch.nn.Module):
        """Emits the stored continuation of each prompt: accuracy must be 100."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):  # teacher-forced: certain of each next token
            logits = 100.0 * torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), len(tok)).float()
            return type("Out", (), {"logits": logits})

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            rows = []
            for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
                prompt = tuple(t for t, m in zip(row, mask, strict=True) if m)
                rows.append(row + (answers[prompt] + [tok.pad_token_id] * max_new_tokens)[:max_new_tokens])
            return torch.tensor(rows)

    assert task.evaluate(Oracle()) == {"char_acc": 100.0, "exact": 100.0, "loss": 0.0}


def test_the_value_loss_of_a_model_that_knows_nothing_is_the_log_of_the_vocabulary():
    tok = char_tokenizer()
    task = UuidTask(5, 0, tok)
    model = small_llama(vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next token equally likely
    scores = task.evaluate(model, batch_size=2)  # three batches: the sums run over them
    assert scores["loss"] == pytest.approx(math.log(len(tok)), rel=1e-6)
