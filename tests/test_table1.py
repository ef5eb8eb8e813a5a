"""Table 1's experiment: every paper cell composes and builds LLaMA-2-7B on the meta device, the runner's dry run on
the paper profile, and a reduced tiny Table 1 end to end through the same runner and reporter."""

import csv
import shlex

import pytest
from hydra import compose, initialize_config_dir

from experiments.reproduce import main, runs
from mora.adapters.build import build_adapter
from mora.models import build_model
from mora.paths import CONFIG_DIR
from mora.training.run import validate

TASKS = ["tulu_v2", "metamath", "biomed", "finance"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _without_run_dir(overrides):
    return [o for o in overrides if not o.startswith("run.dir=")]


@pytest.mark.slow
def test_every_paper_cell_composes_with_table5_and_builds_llama2_7b_on_meta(tmp_path):
    todo, base = runs("table1", "paper", [0], TASKS, tmp_path)
    assert base is None and len(todo) == 4 * 33  # 13 rows; 2 LRs each, x2 for LoRA+'s ratio and ReLoRA's interval
    seen, composed = set(), set()
    for run in todo:
        if (run.task, run.cell) in composed:  # the other learning rates / search points differ only there
            continue
        composed.add((run.task, run.cell))
        cfg = _compose(_without_run_dir(run.overrides))
        validate(cfg, world=8)
        t = cfg.train
        assert cfg.model.name == "llama2_7b" and t.global_batch == 128 and cfg.task.name == run.task
        assert (t.schedule, t.warmup, t.epochs) == {
            "tulu_v2": ("cosine", 500, 2),
            "metamath": ("cosine", 300, 3),
            "biomed": ("linear", 150, 3),
            "finance": ("linear", 150, 3),
        }[run.task]
        if run.task == "metamath" and run.cell not in seen:  # one build per cell: the adapter on the paper's model
            seen.add(run.cell)
            model = build_model(cfg.model, meta=True)
            trainable = build_adapter(model, cfg.adapter).trainable_parameters()
            expected = {"lora-r8": 19_988_480, "mora-r8": 20_014_592, "lora-r256": 639_631_360}
            expected |= {"mora-r256": 639_433_088, "fft": 6_738_415_616}
            if run.cell in expected:
                assert trainable == expected[run.cell]
    assert len(seen) == 13
    lrs = {(r.task, r.cell): set() for r in todo}
    for r in todo:
        lrs[(r.task, r.cell)].add(r.lr)
    assert lrs[("tulu_v2", "mora-r256")] == {3e-5, 5e-5} and lrs[("biomed", "mora-r8")] == {4e-4, 5e-4}
    assert lrs[("finance", "fft")] == {3e-5} and lrs[("metamath", "dora-r256")] == {1e-4, 2e-4}


def test_dry_run_prints_one_launch_command_per_paper_run(capsys):
    assert main(["table1", "--profile", "paper", "--dry-run", "--tasks", "metamath", "--nproc", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 33
    for line in map(shlex.split, lines):
        assert line[1:3] == ["-m", "mora.launch"] and "launcher.num_processes=4" in line and "task=metamath" in line
        relora = "adapter=relora" in line
        assert ("launcher=ddp" if relora else "launcher=deepspeed_zero2") in line  # restarts need DDP
    assert sum("adapter.loraplus_ratio=2" in line for line in lines) == 4
    main(["table1", "--profile", "paper", "--dry-run", "--tasks", "biomed", "--set", "task.source.path=json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 33 and all("task.source.path=json run.dir=" in line for line in lines)


def test_runner_refuses_bad_arguments_in_one_line(capsys):
    for argv, message in (
        (["table9"], "unknown table 'table9'"),
        (["table1", "--tasks", "gsm8k"], "--tasks ['gsm8k'] are not tasks of table1"),
        (["table1", "--cells", "lora-r16"], "--cells ['lora-r16'] are not cells of table1"),
        (["table1", "--jobs", "0"], "--jobs must be at least 1"),
        (["table1", "--set", "train.lr"], "--set ['train.lr']: each override is KEY=VALUE"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_reduced_tiny_table1_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    argv = ["table1", "--cells", "lora-r8", "mora-r8", "--seeds", "0", "--runs", str(tmp_path / "runs")]
    assert main([*argv, "--out", str(out)]) == 0
    table = (out / "table1.md").read_text()
    for row in ("| LoRA | 8 | 50.2 |", "| MoRA | 8 | 49.7 |"):
        line = next(x for x in table.splitlines() if x.startswith(row))
        assert "–" not in line  # every column has a score of ours
    assert "| FFT | - | 50.6 | – |" in table  # a row not run stays empty
    rows = list(csv.DictReader((out / "table1.csv").open()))
    ours = [r for r in rows if r["source"] == "ours"]
    assert {r["column"] for r in ours} >= {"MMLU 0", "MMLU 5", "GSM8K", "MATH", "BioMed.", "Finance", "RCT", "NER"}
    assert {r["method"] for r in ours} == {"LoRA", "MoRA"} and {r["seed"] for r in ours} == {"0"}
    assert all(0 <= float(r["score"]) <= 100 for r in ours)
    assert "| MoRA | 8 | 73.3 |" in (out / "table6.md").read_text()
    assert all((out / f"loss_{t}.png").is_file() for t in TASKS)
    assert len(list((out / "runs" / "tiny" / "metamath").iterdir())) == 4  # 2 cells x 2 learning rates
    assert main([*argv, "--out", str(out)]) == 0  # again: every run is finished and skipped
