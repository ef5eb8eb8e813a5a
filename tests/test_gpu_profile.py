"""Table 2's and Table 3's one-GPU profiles and the prepared GPU check, kept from rotting on CPU: each profile
composes to the sizes its config states (model, ratios, tokens), its runs go through the launcher, it trains two
steps here, and scripts/gpu_check.sh --dry writes its files."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mora.adapters.build import build_adapter
from mora.models import build_model
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.training.run import run
from tests.conftest import HANG_S

BITS_PER_VALUE = 128  # 32 hex digits


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["profile=gpu", "experiment=table2", *overrides])


def _trainable(cfg) -> int:
    return build_adapter(build_model(cfg.model, meta=True), cfg.adapter).trainable_parameters()


def test_the_gpu_profile_is_a_155m_llama_with_the_paper_ratios_its_config_states():
    cfg = _compose()
    model = build_model(cfg.model, meta=True)
    assert 100e6 <= sum(p.numel() for p in model.parameters()) <= 300e6
    assert cfg.model.dtype == "float32" and cfg.train.mixed_precision == "bf16"
    assert cfg.train.global_batch == cfg.train.micro_batch  # one GPU, no accumulation
    bits = cfg.task.n_pairs * BITS_PER_VALUE
    cells = {c["name"]: c for c in cfg.grid.gpu}
    ratios = {}
    for name in ("lora-r8", "lora-r256", "mora-r8", "mora-r256"):
        cell = cells[name]
        overrides = [f"adapter={cell['adapter']}", f"adapter.r={cell['r']}"]
        overrides += [f"adapter.compression={cell['compression']}"] if "compression" in cell else []
        ratios[name] = (_trainable(_compose(*overrides)) / bits, cfg.task.n_pairs / cell["r"])
    # the figures in configs/task_profile/uuid_gpu.yaml
    assert ratios["lora-r8"][0] == pytest.approx(7.4, abs=0.05) and ratios["lora-r8"][1] == 250
    assert ratios["lora-r256"][0] == pytest.approx(59, abs=0.5) and ratios["lora-r256"][1] == pytest.approx(31.25)
    for rank in ("r8", "r256"):  # MoRA at LoRA's budget
        assert ratios[f"mora-{rank}"][0] == pytest.approx(ratios[f"lora-{rank}"][0], rel=0.01)


def test_the_gpu_profile_runs_one_process_per_run_through_the_launcher(capsys):
    from experiments.reproduce import main

    assert main(["table2", "--profile", "gpu", "--seeds", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 9  # the base model, then FFT and 2 LRs x 4 adapter cells
    assert all(" -m mora.train " in line and "profile=gpu" in line for line in lines)
    assert "train.steps=400" in lines[0] and "train.global_batch=250" in lines[0]
    assert "runs/table2/gpu/base/adapter" in lines[1]


@pytest.mark.slow
def test_the_gpu_profile_trains_two_steps_on_cpu(tmp_path):
    # the whole 155 M model and MoRA r = 64 as configured, only fewer pairs and steps, and in float32: a CPU without
    # bf16 instructions takes ~90x longer for a bf16 grad @ weight than in float32 (1.2 s a layer here, LOG.md);
    # the profile's bf16 autocast runs in the rehearsal (tests/test_rehearsal.py) at a smaller width
    overrides = ["adapter=mora", "adapter.r=64", "adapter.compression=sharing", "task.n_pairs=4"]
    overrides += ["train.mixed_precision=null"]
    overrides += ["train.global_batch=2", "train.micro_batch=2", "train.steps=2", "train.eval_steps=[2]"]
    overrides += ["train.progress=false", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"]
    torch.manual_seed(0)
    summary = run(_compose(*overrides))
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["trainable_params"] == 15_146_688 and summary["model"] == "llama_gpu"
    assert [e["step"] for e in summary["evals"]] == [2]


def _table3(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["profile=gpu", "experiment=table3", "task=c4", *overrides])


def test_table3s_gpu_profile_is_the_250m_architecture_at_the_papers_rank_with_the_figures_its_config_states(capsys):
    from experiments.reproduce import main

    assert main(["table3", "--profile", "gpu", "--seeds", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("profile=gpu" in line and "model=llama_250m" in line for line in lines)
    assert all("launcher=" not in line for line in lines)  # one process a run, ReLoRA / ReMoRA included
    cfg = _table3("adapter=mora", "adapter.r=128", "adapter.compression=sharing", "model=llama_250m")
    t, task = cfg.train, cfg.task
    assert (cfg.model.dtype, t.mixed_precision, t.global_batch, t.micro_batch) == ("float32", "bf16", 64, 64)
    assert task.source.path == task.eval_source.path == "package_docs" and task.vocab_size == 32000
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["config"]["vocab_size"] = task.vocab_size  # a model built from config gets the BPE's vocabulary
    built = build_model(model, meta=True)
    assert round(sum(p.numel() for p in built.parameters()) / 1e6, 1) == 247.4  # the config's 247 M
    assert t.steps * t.global_batch * task.block_size == 3_932_160  # its 3.9 M tokens
    assert (t.warmup, t.eval_steps[-1], len(t.eval_steps)) == (t.steps // 10, t.steps, 5)
    relora = _table3("adapter=relora", "adapter.r=128", "model=llama_250m", "adapter.restart.every=24")
    assert relora.adapter.restart.every * 5 == t.steps


@pytest.mark.slow
def test_table3s_gpu_profile_trains_two_steps_on_cpu(tmp_path):
    # the profile's width, heads and rank (r = 128 of 768, MoRA sharing, embeddings and head trained), 2 of its 24
    # layers, python_docs in place of package_docs (a minute to build), a batch of 2 blocks, float32 (see above)
    overrides = ["adapter=mora", "adapter.r=128", "adapter.compression=sharing", "model=llama_250m"]
    overrides += ["model.config.num_hidden_layers=2", "task.source.path=python_docs"]
    overrides += ["task.eval_source.path=python_docs", "task.vocab_size=2048", "task.eval.tokens=2048"]
    overrides += ["train.mixed_precision=null", "train.global_batch=2", "train.micro_batch=2", "train.steps=2"]
    overrides += ["train.warmup=1", "train.eval_steps=[2]", "train.progress=false", "wandb.mode=disabled"]
    summary = run(_table3(*overrides, f"run.dir={tmp_path / 'run'}"))
    assert summary["status"] == "finished" and summary["steps"] == 2 and summary["model"] == "llama_250m"
    assert summary["tokens"] == 2 * 2 * 512 and 1 < summary["evaluation"]["scores"]["ppl"] < 1e5
    assert set(summary["spectrum"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"}


@pytest.mark.slow
def test_gpu_check_dry_writes_its_files_on_cpu(tmp_path):
    out = tmp_path / "out"
    parts = ["table2", "merge", "layer", "table3", "methods"]  # every part; run in the order of gpu_check.PARTS
    cells = ["--cells", "mora-r8", "mora"]  # each table part runs the cells it has
    cmd = ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry", *cells, "--runs", str(tmp_path)]
    cmd += ["--parts"]
    unset = ("MORA_COMMIT", "MORA_COMPILE")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHON": sys.executable}
    result = subprocess.run([*cmd, *parts], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.{e}" for n in ("gpu_check", *parts) for e in ("json", "md"))
    assert all(p.is_file() and p.stat().st_size < 2**20 for p in out.iterdir())
    check = json.loads((out / "gpu_check.json").read_text())
    assert check["environment"]["dry"] and len(check["environment"]["commit"]) == 40
    # a dry check runs the path a GPU takes: every MoRA run on the compiled reference math (inductor's C++ here)
    assert check["environment"]["mora_compile"] == "on" and check["environment"]["mora_compiled"] is True
    assert "MoRA's layers take the compiled path (MORA_COMPILE=on;" in (out / "gpu_check.md").read_text()
    for table, run_name in (
        ("methods", "mora-r8-lr0.003-s0"),
        ("table3", "mora-lr0.0005-s0"),
        ("table2", "mora-r8-lr0.001-s0"),
    ):
        assert json.loads((tmp_path / table / run_name / "env.json").read_text())["mora_compiled"] is True
    assert {name: part["status"] for name, part in check["parts"].items()} == dict.fromkeys(
        ("layer", "methods", "table3", "merge", "table2"), "finished"
    )
    assert list(check["parts"]) == ["layer", "methods", "table3", "merge", "table2"]
    methods = json.loads((out / "methods.json").read_text())["runs"]
    assert {r["run"] for r in methods} == {"base", "mora-r8-lr0.003-s0"}
    assert "| MoRA (rope) | mora-r8 | 8 |" in (out / "methods.md").read_text()
    layer = json.loads((out / "layer.json").read_text())
    variants = {row["variant"] for row in layer["rows"]}
    paths = ("compiled", "eager")
    assert variants == {"base", "lora r=8", *(f"{op} r=8 {path}" for op in ("sharing", "rope") for path in paths)}
    rows = {row["variant"]: row for row in layer["rows"]}
    assert rows["rope r=8 compiled"]["path"] == "compiled" and rows["rope r=8 compiled"]["first_s"] > 0
    assert layer["machine"]["commit"] == check["environment"]["commit"]
    pretraining = json.loads((out / "table3.json").read_text())["runs"]
    assert [(r["run"], r["status"]) for r in pretraining] == [("mora-lr0.0005-s0", "finished")]
    assert "| MoRA | 28.54 | 25.25 |" in (out / "table3.md").read_text()
    runs = json.loads((out / "table2.json").read_text())["runs"]
    assert {r["run"] for r in runs} == {"base", "mora-r8-lr0.001-s0"}  # dry: the cell's first learning rate
    assert all(r["status"] == "finished" and r["startup_s"] > 0 for r in runs)
    assert "| MoRA (rope) | 8 |" in (out / "table2.md").read_text()


def test_gpu_check_refuses_a_folder_with_files_and_writes_nothing(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py"), str(tmp_path), "--dry"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]


def test_gpu_check_refuses_a_bad_mora_compile_in_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "MORA_COMPILE": "fast"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py"), str(tmp_path / "out"), "--dry"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: MORA_COMPILE='fast' is not one of auto, on, off"), lines
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_stopped_from_outside_stops_its_part_and_reports(tmp_path):
    # a job's time limit or a timeout sends SIGTERM: the running part's process group goes with it, and the files
    # say where the check was
    import psutil

    out = tmp_path / "out"
    cmd = ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry", "--parts", "layer", "merge"]
    env = {k: v for k, v in os.environ.items() if k != "MORA_COMMIT"} | {"PYTHON": sys.executable}
    check = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in check.stdout:
        if line.startswith("== layer (budget"):
            break
    while not any("bench/layer.py" in " ".join(child.cmdline()) for child in _children(check.pid)):
        assert check.poll() is None, "the check ended before its layer part started"
        time.sleep(0.05)  # a poll, not a deadline: leaves the core to the process it waits for
    check.terminate()  # the layer benchmark has started: its imports alone take seconds
    rest = check.stdout.read()
    assert check.wait(timeout=HANG_S) == 1, rest
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["layer"] and parts["layer"]["status"] == "stopped by SIGTERM"
    assert "| layer | stopped by SIGTERM |" in (out / "gpu_check.md").read_text()
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert left == []


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_part_is_polled_while_it_runs_and_a_dry_part_has_no_budget(tmp_path, monkeypatch):
    from scripts import gpu_check

    monkeypatch.setattr(gpu_check, "POLL_S", 0.05)
    polled = tmp_path / "polled"
    calls = []

    def poll() -> None:
        calls.append(1)
        if len(calls) == 3:
            polled.touch()

    # the part ends when it has been polled three times, however slow the machine: no race with the clock
    wait = f"import pathlib, time\nwhile not pathlib.Path({str(polled)!r}).exists(): time.sleep(0.01)"
    part = gpu_check.run_part("wait", [sys.executable, "-c", wait], None, poll=poll)
    assert part["status"] == "finished" and len(calls) >= 3 and part["budget_s"] is None


def test_a_part_that_overruns_its_budget_is_stopped():
    from scripts import gpu_check

    forever = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]  # overruns any budget, on purpose
    part = gpu_check.run_part("forever", forever, 0.5)
    assert part["status"] == "stopped at its budget" and part["budget_s"] == 0.5


def test_stopping_a_part_stops_its_whole_process_group(tmp_path):
    import psutil

    from scripts import gpu_check

    child = tmp_path / "child.pid"
    parent = (
        "import pathlib, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])\n"
        f"pathlib.Path({str(child)!r}).write_text(str(p.pid))\n"
        "while True: time.sleep(1)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    while not child.exists() or not child.read_text():  # the grandchild has started
        assert proc.poll() is None
        time.sleep(0.05)
    grandchild = psutil.Process(int(child.read_text()))
    gpu_check._stop_group(proc)
    assert proc.returncode is not None
    try:  # gone with its group: a SIGTERM has no delay to race; only a process that ignored it would hang here
        while grandchild.status() != psutil.STATUS_ZOMBIE:  # not reaped where this container's init does not
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        pass


def test_a_dry_check_has_no_budgets_unless_given(monkeypatch, tmp_path):
    from scripts import gpu_check

    monkeypatch.delenv("MORA_COMPILE", raising=False)
    seen = {}

    def fake_part(name, cmd, budget_s, poll=None):  # records the budgets main() hands out; runs nothing
        seen[name] = budget_s
        assert os.environ["MORA_COMPILE"] == "on"  # a dry check's parts take the GPU's path
        return {"status": "finished", "wall_s": 0.0, "budget_s": budget_s, "command": cmd[1:]}

    def fake_table(table, out, runs, scratch, budget_s, dry, cells):
        seen[table] = budget_s
        return {"status": "finished", "wall_s": 0.0, "budget_s": budget_s, "command": [], "runs_finished": 0}

    monkeypatch.setattr(gpu_check.signal, "signal", lambda *args: None)  # pytest keeps its own handlers
    monkeypatch.setattr(gpu_check, "run_part", fake_part)
    monkeypatch.setattr(gpu_check, "table_part", fake_table)
    assert gpu_check.main([str(tmp_path / "a"), "--dry"]) == 0
    assert seen == {"layer": None, "methods": None, "merge": None}  # the default parts
    seen.clear()
    assert gpu_check.main([str(tmp_path / "b"), "--dry", "--merge-s", "7", "--parts", "table2", "merge"]) == 0
    assert list(seen.items()) == [("merge", 7.0), ("table2", None)]  # in the order of PARTS
    # and the process that called it keeps its own path: a leaked MORA_COMPILE=on once sent every later test of
    # this process through the compiler, until dynamo's graph limit failed them
    assert "MORA_COMPILE" not in os.environ


def test_the_default_parts_fit_a_lent_gpus_call():
    from scripts import gpu_check

    # what has never run on a GPU first, and the default budgets leave a minute of a 600 s call for the rest
    assert list(gpu_check.PARTS)[0] == "layer" and gpu_check.DEFAULT_PARTS[0] == "layer"
    assert sum(gpu_check.BUDGETS_S[p] for p in gpu_check.DEFAULT_PARTS) <= 540


def test_cells_that_no_table_part_has_are_refused_before_anything_is_written(tmp_path, capsys):
    from scripts import gpu_check

    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path / "out"), "--dry", "--parts", "methods", "--cells", "fft"])
    assert stop.value.code == 2 and "methods's gpu profile has none of them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_check_says_when_moras_graphs_did_not_compile_and_its_runs_went_on_eager(tmp_path, monkeypatch):
    # on a GPU whose compiler fails on MoRA's graphs, MORA_COMPILE=auto trains on on the eager path and each run's
    # summary.json says why: the table part and gpu_check.md carry it, so the tokens/s are not taken for the
    # compiled path's
    from scripts import gpu_check

    runs = tmp_path / "runs"
    why = "RuntimeError: no kernel for this GPU"

    def fake_part(name, cmd, budget_s, poll=None):  # the runner's runs: the base, and MoRA stopped at the budget
        for run_name, summary in (("base", {}), ("mora-r8-lr0.003-s0", {"mora_compile_failure": why})):
            (runs / run_name).mkdir(parents=True)
            (runs / run_name / "summary.json").write_text(json.dumps({"status": "stopped", **summary}))
        return {"status": "stopped at its budget", "wall_s": 1.0, "budget_s": budget_s, "command": cmd[1:]}

    monkeypatch.setattr(gpu_check, "run_part", fake_part)
    out = tmp_path / "out"
    out.mkdir()
    part = gpu_check.table_part("methods", out, runs, tmp_path / "scratch", 10.0, False, None)
    assert part["compile_failure"] == why and part["runs_finished"] == 0
    saved = json.loads((out / "methods.json").read_text())["runs"]
    assert [r.get("mora_compile_failure") for r in saved] == [None, why]
    env = gpu_check.environment(dry=True)
    assert f"| methods | stopped at its budget (0 runs finished); MoRA's graphs did not compile ({why})" in (
        gpu_check.markdown(env, {"methods": part})
    )


def test_the_gpu_layer_part_measures_what_issue_23_asks_with_its_goals_token_count_first(tmp_path):
    # bf16 at LLaMA-7B's shapes (the benchmark's default), LoRA and every MoRA operator at r = 8 and 256, the compiled
    # path first and the eager one, 8x2048 tokens first: a part stopped at its budget has the goal's figures
    from scripts import gpu_check

    layer = gpu_check.bench_commands(tmp_path, dry=False)["layer"]

    def values(flag):
        start = layer.index(flag) + 1
        end = next((i for i in range(start, len(layer)) if layer[i].startswith("--")), len(layer))
        return layer[start:end]

    assert "--shapes" not in layer and values("--device") == ["cuda"] and values("--dtype") == ["bfloat16"]
    assert values("--tokens") == ["8x2048", "1x2048"] and values("--ranks") == ["8", "256"]
    assert values("--operators") == ["truncation", "sharing", "decouple", "rope"]
    assert values("--paths") == ["compiled", "eager"] and values("--baselines") == ["lora"]
