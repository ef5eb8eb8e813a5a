"""The training engine on the tiny profile: run folders, bad input, offline failures, reporting."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from mora.adapters.build import PAPER_METHODS
from mora.models import MissingAssetError
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.reporting.table2 import CSV_COLUMNS, line_style, write_results
from mora.training.run import run
from scripts.smoke import check_run_folder, smoke_overrides
from tests.conftest import HANG_S


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_smoke_run_writes_a_complete_run_folder(tmp_path, method):
    summary = run(_compose(*smoke_overrides(method, "uuid", 4, tmp_path / method)))
    assert check_run_folder(tmp_path / method) == []
    assert summary["status"] == "finished" and summary["trainable_params"] > 0
    metrics = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "tokens" in m] == [1, 2, 3, 4]
    # the first step timed apart (compilation on a GPU), and the rate of the three after it
    assert 0 < summary["first_step_s"] < summary["train_s"] and summary["steady_tokens_per_s"] > 0
    assert 0 <= metrics[-1]["eval/char_acc"] <= 100
    if method in ("relora", "remora"):
        assert [m["step"] for m in metrics if m.get("event") == "restart"] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["metamath", "tulu_v2", "biomed", "finance"])
def test_every_text_task_trains_and_evaluates_through_the_engine(tmp_path, task):
    summary = run(_compose(*smoke_overrides("mora", task, 2, tmp_path / task)))
    assert check_run_folder(tmp_path / task) == []
    assert summary["task"] == task and summary["steps"] == 2 and len(summary["data_hash"]) == 16
    evaluation = summary["evaluation"]
    columns = {"metamath": ["gsm8k", "math"], "tulu_v2": ["mmlu_0", "mmlu_5"]}.get(task, [task])
    assert evaluation["step"] == 2 and all(0 <= evaluation["scores"][c] <= 100 for c in columns)
    assert evaluation["details"]["source"] == "fixture" and evaluation["details"]["limit"] == 2
    assert all(b["n"] <= 2 for b in evaluation["details"]["benchmarks"].values())
    metrics = [json.loads(line) for line in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
    assert {f"eval/{c}" for c in columns} <= set(metrics[-1])


def test_epochs_set_the_number_of_steps(tmp_path):
    overrides = smoke_overrides("lora", "metamath", 2, tmp_path / "run")
    summary = run(_compose(*overrides, "train.epochs=2", "task.eval.columns=[gsm8k]"))
    assert summary["epochs"] == 2 and summary["examples"] == 16 and summary["steps"] == 2 * (16 // 8)


def test_same_seed_same_metrics_and_accumulation_invariance(tmp_path):
    common = smoke_overrides("mora", "uuid", 3, tmp_path / "a")[:-1]
    runs = {}
    for name, extra in (("a", ["train.micro_batch=8"]), ("b", ["train.micro_batch=8"]), ("c", ["train.micro_batch=2"])):
        run(_compose(*common, *extra, f"run.dir={tmp_path / name}"))
        runs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = {k: [m["train/loss"] for m in v if "tokens" in m] for k, v in runs.items()}
    assert losses["a"] == losses["b"]
    # 4 micro-batches of 2 == 1 of 8: the same loss at step 1; later steps differ only by float32 summation order,
    # which Adam's first steps amplify on near-zero gradients of the fresh M
    assert losses["c"][0] == pytest.approx(losses["a"][0], abs=1e-6)
    assert losses["c"] == pytest.approx(losses["a"], abs=1e-3)


@pytest.mark.parametrize(
    "override,match",
    [
        ("adapter.r=0", "adapter.r 0: input should be greater than 0"),
        ("train.lr=0", "train.lr 0: input should be greater than 0"),
        ("train.global_batch=10", "global_batch=10 is not divisible"),
        ("train.eval_steps=[1000]", "eval_steps"),
        ("adapter.target_modules=[qkv_proj]", r"target_modules \['qkv_proj'\] are not modules"),
        ("adapter.compression=rotation", "unknown compression 'rotation'"),
        ("train.mixed_precision=fp16", "train.mixed_precision 'fp16': input should be 'bf16'"),
        ("launcher=deepspeed_zero2 train.mixed_precision=bf16", "under DeepSpeed the precision follows model.dtype"),
        ("launcher=deepspeed_zero3 train.spectrum=true", "train.spectrum reads every weight on process 0"),
    ],
)
def test_bad_input_stops_before_work(tmp_path, override, match):
    cfg = _compose(*smoke_overrides("mora", "uuid", 2, tmp_path / "run"), *override.split())
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "run").exists()  # also what is found while building the model comes before any write


def test_a_run_whose_graphs_cannot_compile_trains_on_the_eager_path_and_says_why(tmp_path, monkeypatch, recwarn):
    # MORA_COMPILE=auto on a GPU where inductor fails (here: a layer that wants the compiled path, as on a GPU that
    # Triton supports, and a compiler that raises): the run warns once, trains as the eager run does, and its
    # summary.json records why. Rope: the chunked operator with tables
    import mora.adapters.compiled as compiled
    import mora.adapters.peft_tuner.layer as layer

    def no_kernel(gm, example_inputs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(compiled, "_failure", [])
    monkeypatch.setattr(compiled, "BACKEND", no_kernel)
    losses = {}
    for setting in ("off", "auto"):
        monkeypatch.setenv("MORA_COMPILE", setting)
        if setting == "auto":
            monkeypatch.setattr(layer, "wanted", lambda device: compiled.compile_failure() is None)
        overrides = smoke_overrides("mora", "uuid", 3, tmp_path / setting)
        summary = run(_compose(*overrides, "adapter.r=2", "adapter.compression=rope", "wandb.mode=disabled"))
        assert summary["status"] == "finished"
        assert json.loads((tmp_path / setting / "summary.json").read_text()).get("mora_compile_failure") == (
            None if setting == "off" else "RuntimeError: no kernel for this GPU"
        )
        metrics = [json.loads(line) for line in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        losses[setting] = [m["train/loss"] for m in metrics if "tokens" in m] + [summary["evals"][-1]["eval/loss"]]
    ours = [str(w.message) for w in recwarn if "MoRA's compiled path could not compile" in str(w.message)]
    assert len(ours) == 1 and "RuntimeError: no kernel for this GPU" in ours[0]
    assert len(losses["auto"]) == 4 and losses["auto"] == pytest.approx(losses["off"], rel=1e-5)


def test_bf16_autocast_over_fp32_weights_trains_close_to_fp32(tmp_path):
    fp32 = run(_compose(*smoke_overrides("mora", "uuid", 2, tmp_path / "fp32")))
    bf16 = run(_compose(*smoke_overrides("mora", "uuid", 2, tmp_path / "bf16"), "train.mixed_precision=bf16"))
    assert bf16["status"] == "finished" and bf16["final_train_loss"] != fp32["final_train_loss"]  # autocast ran
    assert bf16["final_train_loss"] == pytest.approx(fp32["final_train_loss"], rel=0.05)


def test_a_one_step_run_has_its_first_step_timed_and_no_rate_after_it(tmp_path):
    summary = run(_compose(*smoke_overrides("mora", "uuid", 1, tmp_path / "one")))
    assert summary["status"] == "finished" and summary["first_step_s"] > 0 and summary["steady_tokens_per_s"] is None


@pytest.mark.slow
def test_a_run_on_the_compiled_path_trains_as_the_eager_one(tmp_path, monkeypatch):
    # the path a GPU takes by default (MORA_COMPILE=auto on CUDA), here through inductor's C++, inside the whole
    # engine: accumulation over two micro-batches, clipping, evaluation under no_grad, saving. Rope: the chunked
    # operator with tables. Float32, so the two paths differ in rounding only.
    import mora.adapters.compiled
    import mora.adapters.peft_tuner.layer as layer

    calls, fresh = [], []
    compiled = layer.compiled_mora_linear
    monkeypatch.setattr(layer, "compiled_mora_linear", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    forget = mora.adapters.compiled.forget_graphs  # each run starts without the graphs of runs before it
    monkeypatch.setattr(mora.adapters.compiled, "forget_graphs", lambda: fresh.append(1) or forget())
    records = {}
    for setting in ("off", "on"):
        monkeypatch.setenv("MORA_COMPILE", setting)
        overrides = smoke_overrides("mora", "uuid", 3, tmp_path / setting)
        summary = run(_compose(*overrides, "adapter.r=2", "adapter.compression=rope", "wandb.mode=disabled"))
        assert summary["status"] == "finished"
        env = json.loads((tmp_path / setting / "env.json").read_text())
        assert (env["mora_compile"], env["mora_compiled"]) == (setting, setting == "on")
        metrics = [json.loads(line) for line in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        saved = load_file(tmp_path / setting / "adapter" / "adapter_model.safetensors")
        records[setting] = ([m["train/loss"] for m in metrics if "tokens" in m], summary["evals"][-1], saved)
        assert bool(calls) == (setting == "on")  # the "on" run took the compiled path, the "off" run never
    assert len(fresh) == 2
    (eager_losses, eager_eval, eager_M), (losses, evaluation, M) = records["off"], records["on"]
    assert len(losses) == 3 and losses == pytest.approx(eager_losses, rel=1e-5)
    assert evaluation["eval/loss"] == pytest.approx(eager_eval["eval/loss"], rel=1e-5)
    assert M.keys() == eager_M.keys() and all(eager_M[k].abs().max() > 1e-4 for k in M)  # M moved from zero
    for k in M:
        torch.testing.assert_close(M[k], eager_M[k], rtol=1e-3, atol=1e-6)


def test_a_finished_run_folder_is_never_overwritten(tmp_path):
    overrides = smoke_overrides("lora", "uuid", 2, tmp_path / "run")
    run(_compose(*overrides))
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(ValueError, match="already holds a finished run"):
        run(_compose(*overrides))
    assert (tmp_path / "run" / "summary.json").read_text() == before


def test_offline_hub_model_fails_fast_naming_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = _compose(*smoke_overrides("lora", "uuid", 2, tmp_path / "run"), "model=llama2_7b")
    with pytest.raises(MissingAssetError, match=r"meta-llama/Llama-2-7b-hf.*make prefetch PROFILE=paper"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # found while building, before anything is written


@pytest.mark.slow
def test_cli_prints_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mora.train", "adapter.r=-1", f"run.dir={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=HANG_S,
    )
    assert result.returncode == 2
    line = "error: adapter.r -1: input should be greater than 0; give adapter.r as a positive integer rank, e.g. "
    assert result.stderr.strip().splitlines()[-1] == line + "adapter.r=8"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_table2_report_from_runs(tmp_path, monkeypatch):
    cells = [
        {"name": "fft", "adapter": "fft", "lrs": [1e-3]},
        {"name": "mora-r8", "adapter": "mora", "r": 2, "compression": "rope", "lrs": [1e-3, 1e-2]},
        {"name": "mora-r256-rope", "adapter": "mora", "r": 2, "compression": "rope", "paper": None, "lrs": [1e-2]},
    ]
    for cell in cells:
        for lr in cell["lrs"]:
            for seed in (0, 1):
                method = cell["adapter"]
                overrides = smoke_overrides(method, "uuid", 2, tmp_path / "runs" / f"{cell['name']}-lr{lr:g}-s{seed}")
                run(_compose(*overrides, f"train.lr={lr}", f"seed={seed}"))
    run(_compose(*smoke_overrides("fft", "uuid", 2, tmp_path / "runs" / "base"), "task.data_seed=1"))
    paths = write_results(tmp_path / "runs", tmp_path / "out", "tiny", cells)
    assert all(p.exists() for p in paths)
    rows = list(csv.DictReader(paths[1].open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    ours = [r for r in rows if r["source"] == "ours"]
    assert {r["method"] for r in ours} == {"FFT", "MoRA (rope)"} and {r["seed"] for r in ours} == {"0", "1"}
    assert len([r for r in rows if r["source"] == "paper"]) == 20
    table = paths[0].read_text()
    assert "| MoRA (rope) | 8 | 10.1 | 15.7 | 87.4 | 100 |" in table and "±" in table
    assert "| MoRA (rope) |  |  |  |  |  | " in table  # a row of ours alone has no paper numbers
    assert "0.01 ↑" in table or "0.001 ↓" in table  # the best LR of a 2-point grid sits at an edge, marked
    base = json.loads((tmp_path / "runs" / "base" / "summary.json").read_text())["evaluation"]["scores"]
    line = "Every cell starts from the base model in `runs/tiny/base/`: FFT, 2 steps of 8 on 16 pairs (data_seed 1; "
    line += f"the cells': 0); on its own pairs it reached {base['char_acc']:.1f}% character accuracy "
    assert line + f"({base['exact']:.1f}% exact) at step 2." in table.splitlines()
    assert (tmp_path / "out" / "runs" / "tiny" / "fft-lr0.001-s0" / "config.yaml").exists()
    assert (tmp_path / "out" / "runs" / "tiny" / "fft-lr0.001-s0" / "env.json").exists()
    kept = tmp_path / "out" / "runs" / "tiny"  # the report rebuilt from the kept records leaves them in place
    assert write_results(kept, tmp_path / "out", "tiny", cells) == paths and paths[0].read_text() == table
    assert len(list(kept.glob("*/summary.json"))) == 9  # 8 cell runs and the base
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a GPU node without it: the tables, no plot
    assert write_results(tmp_path / "runs", tmp_path / "bare", "tiny", cells) == [
        tmp_path / "bare" / "table2.md",
        tmp_path / "bare" / "table2.csv",
    ]


@pytest.mark.slow
def test_multirun_sweep_writes_one_folder_per_job(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mora.train",
            "-m",
            "adapter=lora,mora",
            "adapter.r=2",
            "train.steps=2",
            "train.eval_steps=[2]",
            "task.n_pairs=16",
            "train.global_batch=8",
            "train.micro_batch=8",
            f"run.root={tmp_path}",
            "run.experiment=sweep",
            "train.progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=HANG_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "sweep").iterdir())
    assert folders == ["lora-r2-s42", "mora-r2-s42"]
    assert all(check_run_folder(p) == [] for p in (tmp_path / "sweep").iterdir())


def test_table_runner_refuses_a_finished_run_of_another_config(tmp_path):
    from experiments.reproduce import Run, finished

    overrides = smoke_overrides("lora", "uuid", 2, tmp_path / "run")
    assert not finished(Run("uuid", "lora", 1e-3, 0, tmp_path / "run", overrides), tmp_path)
    run(_compose(*overrides))
    assert finished(Run("uuid", "lora", 1e-3, 0, tmp_path / "run", overrides), tmp_path)
    with pytest.raises(SystemExit, match="holds a finished run of a different config"):
        finished(Run("uuid", "lora", 1e-3, 0, tmp_path / "run", [*overrides, "task.n_pairs=24"]), tmp_path)
    # a run made through mora.launch records its launcher: the same launcher overrides find it finished
    launch = ["launcher=ddp", "launcher.num_processes=2"]
    launched = smoke_overrides("lora", "uuid", 2, tmp_path / "launched")
    run(_compose(*launch, *launched))
    assert finished(Run("uuid", "lora", 1e-3, 0, tmp_path / "launched", launched), tmp_path, launch)


def test_table2_plot_gives_each_operator_one_colour_and_each_rank_one_style():
    rope, sharing = {"method": "mora", "compression": "rope"}, {"method": "mora", "compression": "sharing"}
    decouple = {"method": "mora", "compression": "decouple"}
    lora, fft = {"method": "lora", "compression": None}, {"method": "fft", "compression": None}
    styles = {
        "mora-r8": line_style("mora-r8", rope),
        "mora-r256-rope": line_style("mora-r256-rope", rope),
        "mora-r256-decouple": line_style("mora-r256-decouple", decouple),
        "mora-r256": line_style("mora-r256", sharing),
        "lora-r8": line_style("lora-r8", lora),
        "lora-r256": line_style("lora-r256", lora),
        "fft": line_style("fft", fft),
    }
    assert styles["mora-r8"][0] == styles["mora-r256-rope"][0] != styles["mora-r256"][0]  # rope: one colour
    operators = [styles[name][0] for name in ("mora-r8", "mora-r256", "mora-r256-decouple", "lora-r8", "fft")]
    assert len(set(operators)) == 5 and styles["lora-r8"][0] == styles["lora-r256"][0]
    assert {name: style for name, (_, style) in styles.items()} == {
        "mora-r8": "--",
        "lora-r8": "--",
        "mora-r256-rope": "-",
        "mora-r256-decouple": "-",
        "mora-r256": "-",
        "lora-r256": "-",
        "fft": "-",
    }


@pytest.mark.slow
def test_the_regime_sweep_runs_a_point_and_reports_only_whole_pairs(tmp_path, capsys):
    from experiments.reproduce import main as reproduce

    short = ["--set", "train.steps=2", "train.eval_steps=[2]", "--out", str(tmp_path / "out")]
    runs = ["--runs", str(tmp_path / "runs" / "table2_regime_w64" / "tiny"), "--seeds", "0"]
    assert reproduce(["table2_regime_w64", "--cells", "mora-r8", *runs, *short]) == 0  # no LoRA to compare with
    assert "no table written: no finished pair of LoRA and MoRA runs" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert reproduce(["table2_regime_w64", "--cells", "lora-r8", "mora-r8", *runs, *short]) == 0
    table = (tmp_path / "out" / "regime.md").read_text()
    assert "| w64 | low | 64 | 64 | 2 | 0.60 | 32 |" in table and "| paper | low |" in table
    assert sorted(p.name for p in (tmp_path / "out" / "runs" / "w64").iterdir())[0] == "base"


@pytest.mark.slow
def test_keep_going_runs_past_a_failed_run_reports_the_others_and_exits_1(tmp_path, capsys, monkeypatch):
    # runs outside this process (launcher=local, as on one GPU); one run's process fails
    from experiments import reproduce

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    real = reproduce.command

    def command(run, launcher, nproc):
        failing = run.folder.name == "mora-r8-lr0.003-s0"
        return [sys.executable, "-c", "raise SystemExit(3)"] if failing else real(run, launcher, nproc)

    monkeypatch.setattr(reproduce, "command", command)
    small = ["train.steps=2", "train.eval_steps=[2]", "task.n_pairs=8", "train.global_batch=4", "train.micro_batch=4"]
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["table2", "--launcher", "local", "--cells", "mora-r8", "--seeds", "0", "--runs", str(runs)]
    args += ["--out", str(out), "--set", *small]
    assert reproduce.main([*args, "--keep-going"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: 1 of 3 runs failed: the run in {runs / 'mora-r8-lr0.003-s0'} failed (exit code 3); see its summary"
    ]
    finished = sorted(p.parent.name for p in runs.glob("*/summary.json"))
    assert finished == ["base", "mora-r8-lr0.001-s0", "mora-r8-lr0.01-s0"]  # the run after the failed one too
    assert "| MoRA (rope) | 8 |" in (out / "table2.md").read_text()
    with pytest.raises(SystemExit, match="error: the run in .*mora-r8-lr0.003-s0 failed"):
        reproduce.main(args)  # without --keep-going the first failed run stops the command
