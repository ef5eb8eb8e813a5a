"""Table 3's regime sweep (configs/experiment/table3_regime.yaml): its runs compose with the sweep's rules, the
no-padding ablation really has r_hat dividing every width, the package_docs corpus on a fixture package, the LR of
the modules to save, and a reduced sweep end to end through the runner and mora.reporting.table3_regime."""

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import reproduce
from experiments.reproduce import Run, at_best, experiment, main, runs, tuning_phases
from mora.adapters.build import build_adapter
from mora.models import build_model
from mora.paths import CONFIG_DIR
from mora.reporting import table3_regime
from mora.reporting.common import best_points
from mora.reporting.table3_regime import describe, model_parameters, paper_points
from mora.tasks import corpus
from mora.training.run import config_hash, validate
from tests.conftest import LLAMA_TARGETS, small_llama

EMBHEAD = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _sweep(tmp_path, cells=None):
    """(job, composed config) for every run of the sweep, or for the runs of `cells` only."""
    todo, base = runs("table3_regime", "tiny", [0], ["c4"], tmp_path)
    assert base is None  # pretraining from random init
    jobs = [job for job in todo if cells is None or job.cell in cells]
    return [(job, _compose([o for o in job.overrides if not o.startswith("run.dir=")])) for job in jobs]


def test_every_run_of_the_sweep_composes_with_the_sweeps_rules(tmp_path):
    sweep = _sweep(tmp_path)
    cells = {job.cell for job, _ in sweep}
    points = Counter()
    for job, cfg in sweep:
        validate(cfg)
        t, a, width = cfg.train, cfg.adapter, cfg.model.config.hidden_size
        assert cfg.task.source.path == cfg.task.eval_source.path == "package_docs" and cfg.task.eval.tokens == 51200
        assert (t.global_batch, t.schedule, t.warmup, t.eval_steps[-1]) == (16, "cosine", t.steps // 10, t.steps)
        assert len(t.eval_steps) == 5 and cfg.model.config.intermediate_size * 3 == width * 8
        frozen = "frozen" in job.cell
        assert (a.get("modules_to_save") is None) == frozen and (frozen or list(a.modules_to_save) == EMBHEAD)
        if "r3" not in job.cell:
            assert a.r * 6 == width  # r / width fixed at the paper's 128 / 768
        restart = a.get("restart")
        if restart is not None:
            assert (restart.every * 5, restart.optimizer_reset) == (t.steps, "adapter")
            assert restart.warmup == max(2, t.steps // 200)  # the paper's 50 of 10k
        if not any(v in job.cell for v in ("r3", "chunked", "embedlr", "frozen")):
            points[width, t.steps] += 1
    lengths = {steps for width, steps in points if width == 48}
    widths = {width for width, steps in points if steps == 300}
    assert lengths == {300, 1000, 3000} and widths == {48, 96, 192}
    assert {"lora", "mora", "rope", "relora", "remora"} <= {c.split("-")[0] for c in cells}


def _built(cfg):
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), meta=True)
    return build_adapter(model, cfg.adapter).model


def _r_hats(model):
    return [
        (m.in_features, m.out_features, m.mora_r_hat["default"]) for m in model.modules() if hasattr(m, "mora_r_hat")
    ]


def test_the_no_padding_ablation_has_r_hat_dividing_every_width_and_the_sweeps_own_cell_does_not(tmp_path):
    sweep = {job.cell: cfg for job, cfg in _sweep(tmp_path, {"mora-r3-w96-s300", "mora-w96-s300", "chunked-w96-s300"})}
    ablation = _r_hats(_built(sweep["mora-r3-w96-s300"]))
    assert len(ablation) == 3 * 7 and {r for _, _, r in ablation} == {24, 32}
    assert all(d_in % r == 0 and d_out % r == 0 for d_in, d_out, r in ablation)
    own = _r_hats(_built(sweep["mora-w96-s300"]))
    assert any(d_in % r or d_out % r for d_in, d_out, r in own)  # wrap-around padding where the sweep runs
    assert sweep["chunked-w96-s300"].adapter.compression == "sharing_chunked"


def test_the_embedding_lr_ablation_puts_the_modules_to_save_in_a_group_of_their_own(tmp_path):
    cfg = _sweep(tmp_path, {"mora-embedlr-w96-s300"})[0][1]  # its first run
    assert cfg.train.modules_to_save_lr == 1e-2
    torch.manual_seed(0)
    adapted = build_adapter(small_llama(), {**cfg.adapter, "r": 4, "target_modules": LLAMA_TARGETS})
    optimizer = adapted.optimizer(lr=3e-3, saved_lr=cfg.train.modules_to_save_lr)
    names = {id(p): n for n, p in adapted.model.named_parameters()}
    adapter_group, saved_group = optimizer.param_groups
    assert (adapter_group["lr"], saved_group["lr"]) == (3e-3, 1e-2)
    assert all("mora_" in names[id(p)] for p in adapter_group["params"])
    assert {
        n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in map(names.get, map(id, saved_group["params"]))
    } >= {
        "embed_tokens",
        "lm_head",
        "norm",
    }
    trainable = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable


def test_a_learning_rate_for_modules_to_save_without_any_is_one_line(tmp_path):
    base = ["task=uuid", "adapter=lora", "train.modules_to_save_lr=1e-2", f"run.dir={tmp_path}/run"]
    with pytest.raises(ValueError, match=r"^train.modules_to_save_lr=0.01 .* adapter=lora has none; name the"):
        validate(_compose(base))
    with pytest.raises(ValueError, match=r"adapter=fft trains every weight"):
        validate(_compose([*base, "adapter=fft"]))
    with pytest.raises(ValueError, match=r"train.modules_to_save_lr -1"):
        validate(_compose([*base, "train.modules_to_save_lr=-1"]))
    # unset, it leaves every config hash as it was
    plain = _compose(["task=uuid", "adapter=lora"])
    unset = plain.copy()
    OmegaConf.set_struct(unset, False)
    unset.train.pop("modules_to_save_lr")
    assert config_hash(plain) == config_hash(unset)


def test_package_docs_reads_docstrings_per_module_without_tests_or_repeats(tmp_path):
    package = tmp_path / "pkg"
    (package / "tests").mkdir(parents=True)
    (package / "sub").mkdir()
    (package / "a.py").write_text('"""The module a."""\ndef f():\n    """Shared words."""\n')
    (package / "sub" / "b.py").write_text('"""The module b."""\nclass C:\n    """Shared words."""\n')
    (package / "tests" / "test_a.py").write_text('"""A test, left out."""\n')
    (package / "broken.py").write_text("def (:\n")
    docs = corpus.module_docs(package, "pkg", seen=set())
    assert docs == [
        {"text": "The module a.\n\nShared words.", "timestamp": "", "url": "pkg:a.py"},
        {"text": "The module b.", "timestamp": "", "url": "pkg:sub/b.py"},
    ]
    assert corpus.by_url_hash(docs) == corpus.by_url_hash(reversed(docs))
    many = [{"text": str(i), "timestamp": "", "url": f"u{i}"} for i in range(25)]
    train, valid = corpus.split_of(many, "train", "x"), corpus.split_of(many, "validation", "x")
    assert [d["text"] for d in valid] == ["0", "10", "20"] and len(train) == 22
    with pytest.raises(ValueError, match="the x corpus has splits train, validation, not 'test'"):
        corpus.split_of(many, "test", "x")
    with pytest.raises(ValueError, match="unknown corpus 'c5'; the built-in corpora are python_docs, package_docs"):
        corpus.corpus_split("c5", "train")


def test_package_docs_is_built_once_and_kept_under_the_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_DATA_CACHE", str(tmp_path))
    built = []
    fake = [{"text": "words", "timestamp": "", "url": "pkg:a.py"}]
    monkeypatch.setattr(corpus, "build_package_docs", lambda: built.append(1) or fake)
    corpus.package_docs.cache_clear()
    try:
        assert corpus.package_docs() == tuple(fake)
        corpus.package_docs.cache_clear()
        assert corpus.package_docs() == tuple(fake) and built == [1]
        (kept,) = tmp_path.glob("package_docs-*.json")
        versions = json.loads(kept.read_text())["versions"]
        assert set(versions) == {"python", *corpus.PACKAGES} and versions["torch"].startswith("2.13.0")
    finally:
        corpus.package_docs.cache_clear()


def test_tokens_per_parameter_of_the_paper_and_of_a_run():
    paper = paper_points()
    assert round(paper["250M"]["tokens_per_param"], 1) == 21.2 and round(paper["1.3B"]["tokens_per_param"], 1) == 3.9
    assert (paper["250M"]["width"], round(paper["250M"]["MoRA"], 3)) == (768, 0.854)
    config = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}
    config |= {"vocab_size": 10, "tie_word_embeddings": False}
    llama = small_llama(hidden_size=4, intermediate_size=8, num_key_value_heads=2, vocab_size=10, num_attention_heads=2)
    assert model_parameters(config) == sum(p.numel() for p in llama.parameters())
    run = {
        "config": {"task": {"vocab_size": 10, "block_size": 5}, "model": {"config": {**config, "vocab_size": 3}}},
        "summary": {"steps": 4, "global_batch": 2, "examples": 16},
    }
    assert describe(run) == {
        "width": 4, "steps": 4, "tokens": 40, "tokens_per_param": 40 / model_parameters(config), "epochs": 0.5,
    }  # fmt: skip


def _scored(name: str, seed: int, ppl: float) -> dict:
    return {"dir": Path(f"{name}-s{seed}"), "summary": {"seed": seed, "evaluation": {"scores": {"ppl": ppl}}}}


def test_a_grid_tuned_on_the_first_seed_is_read_at_that_seeds_best_and_the_runner_runs_only_there(tmp_path):
    cells = [{"name": "mora"}, {"name": "lora"}]
    # mora's grid on seed 0 alone (1e-3: 10, 3e-3: 12), seed 1 only at seed 0's best, where it scored 30
    done = [_scored("mora-lr0.001", 0, 10.0), _scored("mora-lr0.003", 0, 12.0), _scored("mora-lr0.001", 1, 30.0)]
    tuned = best_points(done, cells, *table3_regime.TUNING_SCORE, tuned=True)
    assert [r["dir"].name for r in tuned["mora"]] == ["mora-lr0.001-s0", "mora-lr0.001-s1"]
    plain = best_points(done, cells, *table3_regime.TUNING_SCORE)  # by the mean: one seed elsewhere outbids it
    assert [r["dir"].name for r in plain["mora"]] == ["mora-lr0.003-s0"]
    todo = [Run("c4", "mora", lr, 1, tmp_path / f"mora-lr{lr:g}-s1") for lr in (1e-3, 3e-3)]
    assert [r.lr for r in at_best(todo, 0, table3_regime, done, cells)[0]] == [1e-3]
    todo.append(Run("c4", "lora", 1e-2, 1, tmp_path / "lora-lr0.01-s1"))
    cut, missing = at_best(todo, 0, table3_regime, done, cells)  # lora has no run of seed 0: named, not run
    assert [(r.cell, r.lr) for r in cut] == [("mora", 1e-3)] and missing == ["lora"]


def test_table_tune_runs_the_first_seeds_grids_first_and_the_other_seeds_at_their_best(tmp_path):
    todo = [Run("c4", "mora", lr, seed, tmp_path / f"mora-lr{lr:g}-s{seed}") for seed in (0, 1, 2) for lr in (1, 3)]
    (first, cut_first), (later, cut_later) = tuning_phases(todo, [0, 1, 2], "first_seed", None)
    assert (cut_first, cut_later) == (None, 0)  # seed 0's whole grids, then the others cut to seed 0's best
    assert [r.seed for r in first] == [0, 0] and [r.seed for r in later] == [1, 1, 2, 2]
    assert tuning_phases(todo, [0, 1, 2], None, None) == [(todo, None)]  # every seed on every point
    assert tuning_phases(todo[:2], [0], "first_seed", None) == [(todo[:2], None)]  # one seed: its grid
    assert tuning_phases(todo, [0, 1, 2], "first_seed", 5) == [(todo, 5)]  # --at-best-of says which seed
    for table in ("table3_regime", "methods", "methods_regime_w128"):  # tuned on seed 0, read at its best
        assert experiment(table, "tiny")["table"]["tune"] == "first_seed"


def test_an_unknown_tuning_is_refused_in_one_line(monkeypatch):
    real = reproduce.compose_cfg

    def composed(overrides):
        cfg = real(overrides)
        cfg.table.tune = "every_seed"
        return cfg

    monkeypatch.setattr(reproduce, "compose_cfg", composed)
    with pytest.raises(ValueError, match=r"experiment table3_regime: table.tune 'every_seed' is not one of null, "):
        experiment("table3_regime", "tiny")


@pytest.mark.slow
def test_a_reduced_sweep_runs_end_to_end_and_reports_ratios_along_width(tmp_path):
    out = tmp_path / "results"
    cells = ["lora-w48-s300", "mora-w48-s300", "lora-w96-s300", "mora-w96-s300", "chunked-w96-s300"]
    head = ["table3_regime", "--cells", *cells]
    tail = ["--jobs", "1", "--runs", str(tmp_path / "runs"), "--out", str(out), "--set", "train.steps=4"]
    tail += ["train.warmup=1", "train.eval_steps=[2,4]", "task.source.path=python_docs"]
    tail += ["task.eval_source.path=python_docs", "task.train_tokens=4096", "task.eval.tokens=2560"]
    assert main([*head, "--seeds", "0", *tail]) == 0
    table = (out / "regime.md").read_text()
    assert "MoRA / LoRA 0.854, ReMoRA / ReLoRA 0.831" in table
    rows = list(csv.DictReader((out / "regime.csv").open()))
    assert {(r["point"], r["variant"], r["method"]) for r in rows} == {
        ("w48-s300", "", "LoRA"), ("w48-s300", "", "MoRA"), ("w96-s300", "", "LoRA"), ("w96-s300", "", "MoRA"),
        ("w96-s300", "chunked", "MoRA"),
    }  # fmt: skip
    by = {(r["point"], r["variant"], r["method"]): r for r in rows}
    for point, variant in (("w48-s300", ""), ("w96-s300", ""), ("w96-s300", "chunked")):
        mora, lora = by[point, variant, "MoRA"], by[point, "", "LoRA"]
        assert float(mora["ratio"]) == pytest.approx(float(mora["ppl"]) / float(lora["ppl"]), rel=1e-3)
        assert lora["ratio"] == "" and int(mora["steps"]) == 4 and float(mora["epochs"]) > 0
    assert (out / "regime.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    grid = sum(len(c["lrs"]) for c in experiment("table3_regime", "tiny")["cells"] if c["name"] in cells)
    assert len(list((out / "runs" / "tiny").iterdir())) == grid  # every cell's grid, seed 0
    # a second seed at each cell's best learning rate of seed 0 (table.tune): one run a cell, read beside seed 0's
    assert main([*head, "--seeds", "0", "1", *tail]) == 0
    assert len(list((out / "runs" / "tiny").iterdir())) == grid + len(cells)
    seeds = Counter(
        (r["point"], r["variant"], r["method"], r["lr"]) for r in csv.DictReader((out / "regime.csv").open())
    )
    assert len(seeds) == len(cells) and set(seeds.values()) == {2}


def test_where_the_first_seeds_grid_failed_the_later_seeds_are_named_not_run(tmp_path, capsys, monkeypatch):
    # --keep-going: every run of seed 0 fails (outside this process), so seed 1 has no best to run at
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(reproduce, "command", lambda run, launcher, nproc: failing)
    args = ["table3_regime", "--cells", "lora-w48-s300", "--seeds", "0", "1", "--launcher", "local", "--keep-going"]
    assert main([*args, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: 3 of 3 runs failed: the run in ") and len(err) == 2
    assert err[1] == "error: cells not run at their best: lora-w48-s300 (no finished run of seed 0 to take the best of)"


def test_cells_are_picked_by_name_or_pattern_and_a_pattern_of_nothing_is_refused(capsys):
    assert main(["table3_regime", "--cells", "*-s3000", "--seeds", "0", "--dry-run"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "mora.train" in line]
    cells = [c for c in experiment("table3_regime", "tiny")["cells"] if c["name"].endswith("-s3000")]
    assert len(printed) == sum(len(c["lrs"]) for c in cells) and all("-s3000-lr" in line for line in printed)
    with pytest.raises(SystemExit):
        main(["table3_regime", "--cells", "*-s9999", "--dry-run"])
    assert "--cells ['*-s9999'] are not cells of table3_regime" in capsys.readouterr().err
