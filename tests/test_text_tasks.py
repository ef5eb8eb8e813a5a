"""The text recipes (MetaMath, Tülu v2, continual pretraining) on their fixtures: masks, packing, the content-hash
cache, offline errors, and the fixture tokenizer."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mora.models import MissingAssetError
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.prompts import ALPACA, ALPACA_WITH_INPUT, alpaca_prompt
from mora.tasks import build_task, recipes, task_tokenizer
from mora.tasks.data import IGNORE, cache_root
from mora.tasks.tokenizer import fixture_bpe

FIXTURES = REPO_ROOT / "mora" / "tasks" / "fixtures"


def _task_cfg(task: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"task={task}", *overrides]).task


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def _trained(tok, ids, labels) -> str:
    return tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


def test_alpaca_prompt_splits_the_query_as_the_authors():
    assert alpaca_prompt("What is 2+2?") == ALPACA.format(instruction="What is 2+2?")
    two = alpaca_prompt("Solve it.\nx + 1 = 3\nfor x")
    assert two == ALPACA_WITH_INPUT.format(instruction="Solve it.", input="x + 1 = 3\nfor x")
    assert "### Input:" not in alpaca_prompt("no newline") and two.endswith("### Response:")


def test_metamath_trains_on_response_and_eos_only():
    cfg = _task_cfg("metamath", "profile=tiny")
    tok = task_tokenizer(cfg)
    task = build_task(cfg, tok)
    rows = _rows("metamath")
    assert len(task) == len(rows) and len(task.data_hash) == 16
    for row, ex in zip(rows, task.dataset, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert _trained(tok, ids, labels) == row["response"] + tok.eos_token
        n_prompt = labels.index(next(t for t in labels if t != IGNORE))
        assert ids[0] == tok.bos_token_id and tok.decode(ids[1:n_prompt]) == alpaca_prompt(row["query"])
    batch = task.collate(next(task.batches(0, 4, seed=0)))
    assert batch["input_ids"].shape[0] == 4 and ((batch["labels"] == IGNORE) | (batch["attention_mask"] == 1)).all()


def test_metamath_cuts_at_max_length_and_drops_examples_without_a_response_token():
    cfg = _task_cfg("metamath", "profile=tiny", "task.max_length=90")
    task = build_task(cfg, task_tokenizer(cfg))
    assert all(len(ex["input_ids"]) <= 90 for ex in task.dataset)
    assert 0 < len(task) < len(_rows("metamath"))  # three prompts fill 90 tokens on their own
    assert all(any(t != IGNORE for t in ex["labels"]) for ex in task.dataset)


def test_tulu_trains_on_the_assistant_turns_only():
    cfg = _task_cfg("tulu_v2", "profile=tiny")
    tok = task_tokenizer(cfg)
    task = build_task(cfg, tok)
    rows = _rows("tulu_v2")
    assert len(task) == len(rows)
    for row, ex in zip(rows, task.dataset, strict=True):
        messages = row["messages"]
        assistant = "".join(  # open-instruct trains the newline after a turn's eos too, unless the turn is last
            m["content"].strip() + tok.eos_token + ("\n" if i + 1 < len(messages) else "")
            for i, m in enumerate(messages)
            if m["role"] == "assistant"
        )
        assert _trained(tok, ex["input_ids"], ex["labels"]) == assistant
        assert tok.eos_token_id in ex["input_ids"]  # eos in the text is the eos token, not its characters
        text = tok.decode(ex["input_ids"][1:])
        for m in row["messages"]:
            assert f"<|{m['role']}|>\n{m['content'].strip()}" in text
    with_system = next(ex for row, ex in zip(rows, task.dataset, strict=True) if row["messages"][0]["role"] == "system")
    assert tok.decode(with_system["input_ids"][1:]).startswith("<|system|>\n")


@pytest.mark.parametrize("name", ["biomed", "finance"])
def test_continual_pretraining_packs_full_blocks_of_every_token(name):
    cfg = _task_cfg(name, "profile=tiny", "task.block_size=32")
    tok = task_tokenizer(cfg)
    task = build_task(cfg, tok)
    ids = [tok(row["text"], add_special_tokens=False).input_ids for row in _rows(name)]
    stream = [t for doc in ids for t in [tok.bos_token_id, *doc, tok.eos_token_id]]
    assert len(task) == len(stream) // 32
    for i, ex in enumerate(task.dataset):
        assert ex["input_ids"] == ex["labels"] == stream[i * 32 : (i + 1) * 32]


def test_tokenised_data_is_cached_under_a_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_DATA_CACHE", str(tmp_path / "cache"))
    cfg = _task_cfg("metamath", "profile=tiny")
    tok = task_tokenizer(cfg)
    first = build_task(cfg, tok)
    assert [p.name for p in cache_root().iterdir()] == [f"metamath-{first.data_hash}"]
    assert build_task(cfg, tok).data_hash == first.data_hash  # a hit: nothing rebuilt
    assert len(list(cache_root().iterdir())) == 1
    shorter = build_task(_task_cfg("metamath", "profile=tiny", "task.max_length=200"), tok)
    assert shorter.data_hash != first.data_hash
    data = tmp_path / "data.jsonl"
    data.write_text((FIXTURES / "metamath.jsonl").read_text().replace("The answer is: 14", "The answer is: 15"))
    changed = build_task(_task_cfg("metamath", "profile=tiny", f"task.source.data_files.train={data}"), tok)
    assert changed.data_hash not in (first.data_hash, shorter.data_hash)


def test_a_missing_hub_dataset_offline_is_one_line_naming_prefetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = _task_cfg("metamath", "profile=paper")
    with pytest.raises(MissingAssetError, match=r"dataset 'meta-math/MetaMathQA'.*make prefetch PROFILE=paper") as e:
        build_task(cfg, fixture_bpe())
    assert "\n" not in str(e.value)


def test_bad_sources_are_one_clear_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=f"data file {missing} does not exist"):
        build_task(_task_cfg("metamath", "profile=tiny", f"task.source.data_files.train={missing}"), fixture_bpe())
    with pytest.raises(ValueError, match="task.source.path is not set"):
        build_task(_task_cfg("biomed", "profile=paper"), fixture_bpe())
    with pytest.raises(ValueError, match="no column 'body'"):
        build_task(_task_cfg("biomed", "profile=tiny", "task.text_column=body"), fixture_bpe())
    with pytest.raises(ValueError, match="unknown task recipe 'squad'"):
        build_task(OmegaConf.create({"name": "squad", "recipe": "squad"}), fixture_bpe())


def test_recipes_and_the_fixture_tokenizer():
    assert {"uuid", "metamath", "tulu_v2", "cpt"} <= set(recipes())
    fixture_bpe.cache_clear()
    a = fixture_bpe()
    fixture_bpe.cache_clear()
    b = fixture_bpe()
    assert a.get_vocab() == b.get_vocab() and len(a) > 1000  # trained, deterministic
    text = _rows("metamath")[0]["response"]
    assert a.decode(a(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless
    assert a(text).input_ids[0] == a.bos_token_id  # <s> first when special tokens are asked for (lm-eval does)


def test_missing_evaluation_sets_offline_stop_before_training(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = _task_cfg("metamath", "profile=tiny", "task.eval.source=hub")
    with pytest.raises(MissingAssetError, match=r"evaluation dataset 'openai/gsm8k' \(main\).*make prefetch") as e:
        build_task(cfg, fixture_bpe())
    assert "\n" not in str(e.value)


def test_batches_are_a_function_of_seed_and_step():
    cfg = _task_cfg("tulu_v2", "profile=tiny")
    task = build_task(cfg, task_tokenizer(cfg))

    def ids(start, n, seed):
        return [[e.input_ids for e in b] for b, _ in zip(task.batches(start, 4, seed), range(n), strict=False)]

    first = ids(0, 7, seed=1)
    assert first == ids(0, 7, seed=1) and ids(4, 3, seed=1) == first[4:]  # a resumed run sees the same batches
    assert first != ids(0, 7, seed=2)
    assert sorted(map(str, sum(first[:3], []))) == sorted(map(str, task.dataset["input_ids"]))  # an epoch: each once
