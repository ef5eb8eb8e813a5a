"""Forgetting (issue #21): the mixture recipe that trains the comparison's base on pairs and text, probes (tasks a run
evaluates but does not train on), the runner's `forgetting` base whose parts every cell probes, and the reporter's
change from the base's scores, on a case with a known answer: an adapter that is a no-op forgets nothing."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mora.config import ConfigError
from mora.paths import REPO_ROOT
from mora.reporting.methods import base_scores, forgetting, start_scores, write_results
from mora.tasks import build_task, check_sections
from mora.tasks.mixture import split
from mora.tasks.probes import Probed
from mora.tasks.uuid import ALPHABET, char_tokenizer
from mora.training.run import run
from tests.conftest import small_llama

sys.path.insert(0, str(REPO_ROOT))
from experiments.reproduce import compose_cfg, experiment, literal_overrides, runs  # noqa: E402

TEXT = {  # the fixture in C4's schema, in blocks of 32 characters
    "recipe": "c4",
    "from_scratch": False,
    "source": {"path": "json", "name": None, "split": "train", "data_files": {"train": "tests/fixtures/c4.jsonl"}},
    "eval_source": {"path": "json", "name": None, "split": "train", "data_files": {"train": "tests/fixtures/c4.jsonl"}},
    "text_column": "text",
    "block_size": 32,
    "train_tokens": 32 * 40,
    "tokenizer": None,
    "vocab_size": None,
    "eval": {"tokens": 32 * 8, "batch_size": 4},
}
PAIRS = {"recipe": "uuid", "n_pairs": 8, "data_seed": 1, "alphabet": "ascii"}
UUID = {"name": "uuid", "recipe": "uuid", "n_pairs": 8, "data_seed": 0}


def _mixture(**shares):
    return {"name": "mix", "recipe": "mixture", "parts": {"pairs": PAIRS, "text": TEXT}, "shares": shares}


@pytest.mark.parametrize(
    ("batch", "shares", "counts"),
    [
        (32, {"a": 1, "b": 1}, {"a": 16, "b": 16}),
        (10, {"a": 1, "b": 2}, {"a": 3, "b": 7}),  # 3.33 / 6.67: the larger remainder gets the odd example
        (3, {"a": 1, "b": 100}, {"a": 1, "b": 2}),  # every part one example at least
    ],
)
def test_a_global_batch_splits_by_the_shares(batch, shares, counts):
    assert split(batch, shares) == counts


def test_a_batch_smaller_than_the_parts_is_refused():
    with pytest.raises(ValueError, match="train.global_batch=1 is below the 2 parts"):
        split(1, {"a": 1, "b": 1})


def test_the_ascii_alphabet_keeps_the_uuid_ids_and_reads_text():
    ascii_tok, uuid_tok = char_tokenizer("ascii"), char_tokenizer("uuid")
    assert ascii_tok(ALPHABET).input_ids == uuid_tok(ALPHABET).input_ids  # a pair is the same ids in both
    text = "def f(x):\n\treturn x  # Done!</s>"
    ids = ascii_tok(text).input_ids
    assert len(ids) == len(text) - len("</s>") + 1 and ids[-1] == ascii_tok.eos_token_id
    assert ascii_tok.unk_token_id not in ids and ascii_tok.decode(ids, skip_special_tokens=True) == text[:-4]
    assert uuid_tok("xyz").input_ids == [uuid_tok.unk_token_id] * 3


def test_a_mixture_batch_takes_each_parts_share_from_its_own_seeded_order():
    tokenizer = char_tokenizer("ascii")
    task = build_task(_mixture(pairs=1, text=3), tokenizer)
    assert len(task) == 8 + 40
    batch = next(task.batches(0, 8, seed=0))
    lengths = [len(e.input_ids) for e in batch]
    assert lengths == [75] * 2 + [32] * 6  # 2 pairs (<s>key:value</s>), 6 text blocks
    # a function of (seed, step): resuming at step 5 gives what step 5 gave
    stream = task.batches(0, 8, seed=3)
    fifth = [next(stream) for _ in range(6)][5]
    assert [e.input_ids for e in next(task.batches(5, 8, seed=3))] == [e.input_ids for e in fifth]
    # each part evaluated as alone, under its name
    scores = task.evaluate(small_llama(vocab_size=len(tokenizer)), batch_size=8)
    assert set(scores) == {"pairs/char_acc", "pairs/exact", "pairs/loss", "text/loss", "text/ppl", "text/tokens"}
    alone = build_task({"name": "text", **TEXT}, tokenizer).evaluate(small_llama(vocab_size=len(tokenizer)), 8)
    assert scores["text/ppl"] == alone["ppl"]


def test_probes_are_evaluated_not_trained_and_leave_the_data_hash_alone():
    tokenizer = char_tokenizer("ascii")
    plain = {**UUID, "alphabet": "ascii"}
    task = build_task({**plain, "probes": {"text": TEXT}}, tokenizer)
    alone = build_task(plain, tokenizer)
    assert isinstance(task, Probed) and task.data_hash == alone.data_hash and len(task) == len(alone)
    assert [e.input_ids for e in next(task.batches(0, 4, 0))] == [e.input_ids for e in next(alone.batches(0, 4, 0))]
    scores = task.evaluate(small_llama(vocab_size=len(tokenizer)), batch_size=8)
    assert {"char_acc", "exact", "loss", "text/ppl", "text/loss", "text/tokens"} == set(scores)


@pytest.mark.parametrize(
    ("section", "line"),
    [
        (
            {**UUID, "probes": {"text": {**TEXT, "block_size": 1}}},
            "task.probes.text.block_size 1: input should be greater than or equal to 2",
        ),
        (
            {**UUID, "probes": {"x": {"recipe": "nope"}}},
            "unknown task recipe 'nope' (task.probes.x.recipe)",
        ),
        ({**_mixture(pairs=1), "name": "mix"}, "task.shares {'pairs': 1}: the parts are pairs, text: one weight each"),
        ({**_mixture(pairs=1, text=0)}, "task.shares.text 0: input should be greater than 0"),
        (
            {**_mixture(pairs=1, text=1), "parts": {"pairs": {**PAIRS, "alphabet": "latin"}, "text": TEXT}},
            "task.parts.pairs.alphabet 'latin': input should be 'uuid' or 'ascii'",
        ),
    ],
)
def test_a_bad_sub_task_is_one_line_naming_its_full_key(section, line):
    with pytest.raises((ConfigError, ValueError), match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        check_sections(section)


TRICKY = ["python_docs", "a, b", "train[:1%]", "null", "1", "", "it's", "a\\b", "end\\", "q\\'", "{x: 1}", "\n"]


@pytest.mark.parametrize("value", [*TRICKY, 1, 2.5e-07, 0.1 + 0.2, True, None, ["\n", "x,y"], {}])
def test_a_probe_section_reaches_the_cells_unchanged(value):
    # the runner passes the base's parts to each cell as Hydra overrides: every leaf parses back to itself
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = literal_overrides("task.probes.x", {"leaf": value})
    assert override.startswith("++task.probes.x.leaf=")
    assert OverridesParser.create().parse_override(override).value() == value


def test_a_nested_probe_section_becomes_one_override_per_leaf():
    assert literal_overrides("task.probes", {"t": {"source": {"path": "json", "name": None}, "eval": {}}}) == [
        "++task.probes.t.source.path='json'",
        "++task.probes.t.source.name=null",
        "++task.probes.t.eval={}",
    ]


# the base and two cells, a few steps each (the runner's own overrides, steps shortened for every run)
SHORT = ["train.steps=4", "train.eval_steps=[4]", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    """The comparison's tiny base trained four steps, LoRA from it at a learning rate of 1e-30 (a no-op: the update is
    below float32's resolution of every weight) and FFT at 1e-2, each probing the base's pairs and text."""
    root = tmp_path_factory.mktemp("forgetting")
    todo, base = runs("methods", "tiny", [0], ["uuid"], root, ["lora-r8", "fft"], SHORT, one_point=True)
    run(compose_cfg(base.overrides))
    for cell in todo:
        lr = "train.lr=1e-30" if cell.cell == "lora-r8" else "train.lr=1e-2"
        run(compose_cfg([*cell.overrides[:-1], lr, cell.overrides[-1]]))
    return root


@pytest.mark.slow
def test_a_no_op_adapter_forgets_nothing_and_fft_forgets_something(probed):
    loaded = [
        {"dir": d, "summary": json.loads((d / "summary.json").read_text())} for d in sorted(probed.iterdir())
    ]  # fmt: skip
    base = base_scores(loaded)
    assert set(base) == {"pairs/char_acc", "pairs/loss", "text/ppl"} and base["text/ppl"] > 1
    (noop,) = [r for r in loaded if r["dir"].name.startswith("lora-r8")]
    (fft,) = [r for r in loaded if r["dir"].name.startswith("fft")]
    assert forgetting(noop["summary"]["evals"][-1], base) == dict.fromkeys(base, 0.0)  # exactly
    forgot = forgetting(fft["summary"]["evals"][-1], base)  # four steps of FFT on the cells' pairs
    assert forgot["text/ppl"] != 0.0 and forgot["pairs/loss"] != 0.0
    # the cells read text with the base's tokenizer (saved with it): printable ASCII, no <unk> in the probe
    assert json.loads((probed / "base" / "adapter" / "tokenizer.json").read_text())["model"]["vocab"]["A"] > 0


@pytest.mark.slow
def test_the_table_states_the_base_and_each_cells_change_from_it(probed, tmp_path):
    cells = experiment("methods", "tiny")["cells"]
    # the fixture's learning rates are in no grid of the experiment: its table reports neither run
    grid = write_results(probed, tmp_path / "grid", "tiny", cells)[0].read_text()
    assert "| lora-r8 | lora-r8 | – |" in grid and "| fft | fft | – |" in grid
    lrs = {"lora-r8": [1e-30], "fft": [1e-2]}  # grids that hold them
    cells = [{**cell, "lrs": lrs.get(cell["name"], cell["lrs"])} for cell in cells]
    md, csv_path, _ = write_results(probed, tmp_path, "tiny", cells)
    table = md.read_text()
    assert "the base model scores pairs/char_acc" in table
    (lora,) = [line for line in table.splitlines() if "| lora-r8 |" in line]
    assert lora.split(" | ")[5:8] == ["0.0", "0.00", "0.0"]  # Δ base pairs, Δ pairs loss, Δ text ppl
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    row = dict(zip(header, next(line for line in lines if line.startswith("lora-r8")).split(","), strict=True))
    assert float(row["delta_pairs_char_acc"]) == 0.0 and float(row["probe_text_ppl"]) > 1
    assert (tmp_path / "runs" / "tiny" / "base" / "summary.json").is_file()  # the base's record is kept


def test_a_probe_scores_the_model_as_it_is():
    """Through a task's probes, a model that predicts every token as equally likely scores the vocabulary's size as
    the text's perplexity and its log as the pairs' loss: the known values, whatever the task trains on."""
    tokenizer = char_tokenizer("ascii")
    model = small_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform over the vocabulary
    task = build_task({**UUID, "alphabet": "ascii", "probes": {"text": TEXT, "pairs": PAIRS}}, tokenizer)
    scores = task.evaluate(model, 4)
    assert scores["text/ppl"] == pytest.approx(len(tokenizer), rel=1e-5)
    assert scores["pairs/loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-6)


@pytest.mark.slow
def test_without_a_base_each_run_forgets_from_its_own_step_0(tmp_path):
    """The paper profile's cells start from a pretrained model no run of the table trained: each run scores its
    probes at step 0 (train.eval_steps holds 0) and its Δ columns are the change from there. A no-op adapter
    changes nothing, four steps of FFT change the text's perplexity; both start from the same model."""
    common = ["profile=tiny", "experiment=methods", "task=uuid", "task.n_pairs=8", "++task.alphabet=ascii"]
    common += [*literal_overrides("task.probes", {"text": TEXT}), "train.steps=4", "train.eval_steps=[0,4]"]
    common += ["train.checkpoint_every=0", "train.progress=false", "train.global_batch=4", "train.micro_batch=4"]
    for name, adapter, lr in (("lora-r8", ["adapter=lora", "adapter.r=2"], 1e-30), ("fft", ["adapter=fft"], 1e-2)):
        run(compose_cfg([*common, *adapter, f"train.lr={lr}", f"run.dir={tmp_path / 'runs' / f'{name}-lr{lr:g}-s0'}"]))
    folders = sorted((tmp_path / "runs").iterdir())
    loaded = [{"dir": d, "summary": json.loads((d / "summary.json").read_text())} for d in folders]
    firsts = [r["summary"]["evals"][0] for r in loaded]
    assert [e["step"] for e in firsts] == [0, 0] and all("train/loss" not in e for e in firsts)
    assert firsts[0]["eval/text/ppl"] == firsts[1]["eval/text/ppl"]  # the same model before training
    assert base_scores(loaded) == {}  # no base run
    by = {r["dir"].name.split("-lr")[0]: r for r in loaded}
    assert forgetting(by["lora-r8"]["summary"]["evals"][-1], start_scores(by["lora-r8"], {})) == {"text/ppl": 0.0}
    assert forgetting(by["fft"]["summary"]["evals"][-1], start_scores(by["fft"], {}))["text/ppl"] != 0.0
    cells = [{"name": "lora-r8", "adapter": "lora", "lrs": [1e-30]}, {"name": "fft", "adapter": "fft", "lrs": [1e-2]}]
    md, csv_path, _ = write_results(tmp_path / "runs", tmp_path / "out", "tiny", cells)
    table = md.read_text()
    assert "each run scores the probes at step 0, before training" in table
    (lora,) = [line for line in table.splitlines() if "| lora-r8 |" in line]
    assert lora.split(" | ")[7] == "0.0"  # Δ text ppl
    steps = {line.split(",")[5] for line in csv_path.read_text().splitlines()[1:]}
    assert steps == {"4"}  # step 0 is the start, not an evaluation of training
