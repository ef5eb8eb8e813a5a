"""The methods PEFT ships, by config (configs/adapter with `method: peft`): each of the comparison's tiny cells trains
two steps through the engine, saves, reloads to the same scores and merges to the same logits; the budget table
matches LoRA's count at every cell; the merge check knows a broken merge; the comparison's records and table."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mora.adapters.build import build_adapter
from mora.evaluation.merge import merge_check
from mora.inspect import footprint, lora_at
from mora.models import build_model
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.reporting.methods import CSV_COLUMNS, HEADER, write_results
from mora.training.reload import evaluate_saved
from mora.training.run import run
from scripts.smoke import check_run_folder
from tests.conftest import LLAMA_TARGETS, small_llama

sys.path.insert(0, str(REPO_ROOT))
from experiments import budgets  # noqa: E402
from experiments.reproduce import compose_cfg, experiment, runs  # noqa: E402

PEFT_ADAPTERS = sorted(
    p.stem for p in (CONFIG_DIR / "adapter").glob("*.yaml") if yaml.safe_load(p.read_text())["method"] == "peft"
)
# two steps at a learning rate that moves every adapter, on 8 pairs (a fast evaluation)
SHORT = [
    "train.steps=2",
    "train.eval_steps=[2]",
    "train.global_batch=8",
    "train.micro_batch=8",
    "task.n_pairs=8",
    "train.lr=1e-2",
]  # the comparison sets train.merge_check itself


def test_every_method_of_the_issue_has_a_config():
    assert PEFT_ADAPTERS == ["c3a", "gralora", "hira", "lokr", "miss", "randlora", "shira"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Each PEFT method's low-budget tiny cell, LoRA's and DoRA's, two steps each from a random tiny LLaMA (not the
    comparison's base model, which would take a run of its own, nor its probes: tests/test_forgetting.py), in the
    comparison's folder layout."""
    root = tmp_path_factory.mktemp("methods")
    cells = [f"{name}-r8" for name in (*PEFT_ADAPTERS, "lora", "dora")]  # DoRA's: a rank_pattern
    todo, _ = runs("methods", "tiny", [0], ["uuid"], root, cells, one_point=True)
    for cell in todo:
        overrides = [o for o in cell.overrides if not o.startswith(("model.pretrained=", "train.lr=", "++task.probes"))]
        run(compose_cfg([*overrides[:-1], *SHORT, overrides[-1]]))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [*PEFT_ADAPTERS, "dora"])
def test_each_method_trains_saves_reloads_and_merges(trained, adapter):
    (folder,) = trained.glob(f"{adapter}-r8-lr*-s0")
    assert check_run_folder(folder) == []
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == adapter and summary["rank"] == 2
    # merged logits equal unmerged ones after two steps that moved the adapter (PEFT merges all of them)
    assert summary["merge_equal"] is True and summary["merge_s"] >= 0 and summary["merge_rel_diff"] < 1e-4
    # what was trained is what the budget table counts, and the file on disk holds those tensors (+ a header)
    cfg = OmegaConf.load(folder / "config.yaml")
    counted = footprint(cfg.model, cfg.adapter)
    assert summary["trainable_params"] == counted.trainable
    assert 0 <= summary["adapter_file_bytes"] - counted.saved_bytes < 16 * 1024
    assert summary["peak_rss_mb"] > 0 and summary["train_s"] > 0 and summary["eval_s"] > 0
    result = evaluate_saved(folder)  # the folder alone, read back: the run's scores
    assert result["agree"], result


@pytest.mark.slow
def test_the_comparisons_records_table_and_plot(trained, tmp_path):
    cells = [{**cell, "lrs": [1e-2]} for cell in experiment("methods", "tiny")["cells"]]  # the fixture's (SHORT)
    paths = write_results(trained, tmp_path, "tiny", cells)
    assert [p.name for p in paths] == ["methods.md", "methods.csv", "methods.png"] and paths[2].stat().st_size > 0
    table = paths[0].read_text()
    assert "| " + " | ".join(HEADER) + " |" in table
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and "-r" in line}
    assert set(rows) == {c["name"] for c in cells if c["name"] != "fft"}
    assert "| HiRA | hira-r8 | 2 |" in rows["hira-r8"] and rows["hira-r8"].endswith("| yes |")
    assert rows["hira-r256"].count("–") == len(HEADER) - 2  # not run: a row of dashes, never a number
    with paths[1].open() as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == CSV_COLUMNS and len(lines) == 9  # one evaluated step per run
    assert {line["merge_equal"] for line in lines} == {"True"}
    # the records are kept beside the table
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == sorted(p.name for p in trained.iterdir())


def _broken_merge(model):
    """A merge that adds every delta twice: the merged model then differs from the one that was trained."""
    merge = model.merge_adapter

    def twice():
        merge()
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.base_layer.weight.data += layer.get_delta_weight("default")

    model.merge_adapter = twice
    return model


@pytest.mark.parametrize("broken", [False, True])
def test_merge_check_tells_a_broken_merge(broken):
    adapted = build_adapter(small_llama(), {"method": "lora", "r": 2, "alpha": 4, "target_modules": LLAMA_TARGETS})
    for name, p in adapted.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a delta that changes the logits
    model = _broken_merge(adapted.model) if broken else adapted.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = merge_check(model, vocab_size=50)
    assert result["merge_equal"] is (not broken) and (result["merge_rel_diff"] > 1e-2) is broken
    if not broken:  # unmerged again: the weights as they were
        assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in model.state_dict().items())


@pytest.mark.parametrize("adapter", PEFT_ADAPTERS)
def test_footprint_extends_one_and_two_layers_to_the_whole_model_exactly(adapter):
    # the tiny cell's knob, counted as the budget table counts it, against the whole model built for real
    (cell,) = runs("methods", "tiny", [0], ["uuid"], Path("/nonexistent"), [f"{adapter}-r256"], one_point=True)[0]
    cfg = compose_cfg(cell.overrides)
    whole = build_adapter(build_model({**OmegaConf.to_container(cfg.model), "pretrained": None}), cfg.adapter)
    counted = footprint(cfg.model, cfg.adapter)
    assert counted.trainable == whole.trainable_parameters()


def test_the_budget_table_is_the_codes_and_every_cell_matches_loras_budget():
    fresh = budgets.rows("tiny")
    assert {row.cell for row in fresh} == {c["name"] for c in experiment("methods", "tiny")["cells"]} - {"fft"}
    off = {row.cell: row.ratio for row in fresh if abs(row.ratio - 1) > budgets.TOLERANCE}
    assert not off, f"cells off LoRA's budget by more than 10%: {off}"
    kept = budgets.read_csv(REPO_ROOT / "results" / "methods" / "budgets.csv")
    assert [row for row in kept if (row.experiment, row.profile) == ("methods", "tiny")] == fresh  # as counted
    # the regime point's cells: within 10%, or as close as the method allows and the cell says why
    regime = budgets.rows("tiny", table="methods_regime_w128")
    assert regime == [row for row in kept if row.experiment == "methods_regime_w128"]
    assert {row.cell for row in regime} == {c["name"] for c in experiment("methods_regime_w128", "tiny")["cells"]} - {
        "fft"
    }
    assert {row.cell for row in regime if abs(row.ratio - 1) > budgets.TOLERANCE} == {"c3a-r8"}
    assert [row.cell for row in regime if row.off_budget] == ["c3a-r8"] and not any(row.off_budget for row in fresh)
    gpu = [row for row in kept if row.profile == "gpu"]  # the one-GPU profile's low budget, recounted (seconds)
    assert {row.cell for row in gpu} == {c["name"] for c in experiment("methods", "gpu")["cells"]}
    assert all(abs(row.ratio - 1) <= budgets.TOLERANCE for row in gpu) and budgets.rows("gpu") == gpu
    paper = [row for row in kept if row.profile == "paper"]
    assert {row.cell for row in paper} == {c["name"] for c in experiment("methods", "paper")["cells"]} - {"fft"}
    assert all(abs(row.ratio - 1) <= budgets.TOLERANCE for row in paper)
    # the paper profile's high budget recounted (on the meta device: seconds; SHiRA's real 7B layers take a minute)
    cells = [row.cell for row in paper if row.cell.endswith("r256") and not row.cell.startswith("shira")]
    assert budgets.rows("paper", cells) == [row for row in paper if row.cell in cells]
    # the methods comparison's page holds the table as the code writes it
    assert budgets.markdown(kept).strip() in (REPO_ROOT / "docs" / "methods.md").read_text()


def test_lora_at_a_budget():
    assert lora_at({"r": 8, "target_modules": ["q_proj"], "args": {"r": 15}}) == {
        "method": "lora",
        "r": 8,
        "alpha": 16,
        "target_modules": ["q_proj"],
    }
