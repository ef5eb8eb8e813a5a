"""Bad input on every entry point: exit code 2, one line `error: ...` naming the bad value, no traceback, and nothing
written. The engine's commands run as a user runs them (a fresh process each); the table runner in this process."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.reproduce import main as reproduce
from mora.paths import REPO_ROOT

pytestmark = pytest.mark.slow

# (entry point, arguments, what the line must name); {file} is a file that exists, {runs} an empty folder
CASES = [
    ("mora.train", ["train.lr=abc"], "'abc'"),
    ("mora.train", ["train.steps=ten"], "'ten'"),
    ("mora.train", ["train.lr=-1"], "train.lr -1"),
    ("mora.train", ["train.schedule=cosin"], "'cosin'"),
    ("mora.train", ["train.eval_steps=[-1,5]"], "train.eval_steps -1"),
    ("mora.train", ["train.eval_steps=5"], "train.eval_steps 5"),
    ("mora.train", ["train.eval_steps=[500]"], "[500]"),
    ("mora.train", ["train.mixed_precision=fp16"], "'fp16'"),
    ("mora.train", ["train.spectrum=maybe"], "'maybe'"),
    ("mora.train", ["train.micro_batch=0"], "train.micro_batch 0"),
    ("mora.train", ["train.global_batch=30"], "train.global_batch=30"),
    ("mora.train", ["adapter.r=0"], "adapter.r 0"),
    ("mora.train", ["adapter.r=2.5"], "adapter.r 2.5"),
    ("mora.train", ["adapter.dropout=1.5"], "adapter.dropout 1.5"),
    ("mora.train", ["adapter.target_modules=[]"], "adapter.target_modules []"),
    ("mora.train", ["model.dtype=fp8"], "'fp8'"),
    ("mora.train", ["seed=abc"], "'abc'"),
    ("mora.train", ["adapter=nope"], "adapter/nope"),
    ("mora.train", ["train.nokey=3"], "train.nokey"),
    ("mora.train", ["adapter.target_modules=[nope]"], "['nope']"),  # found while building: still nothing written
    ("mora.train", ["task.n_pairs=0"], "task.n_pairs"),
    ("mora.train", ["++task.probes.text.recipe=nope"], "(task.probes.text.recipe)"),  # a probe: its full key
    ("mora.train", ["task=uuid_text", "task.parts.pairs.n_pairs=-1"], "task.parts.pairs.n_pairs -1"),
    ("mora.train", ["run.dir={file}"], "{file}"),
    ("mora.train", ["run.dir={file}/run"], "{file}/run"),
    ("mora.train", ["run.dir=/proc/mora-lab/run"], "'/proc/mora-lab/run': cannot be created"),  # no such parent
    ("mora.train", ["run.dir=/sys/mora-lab-run"], "'/sys/mora-lab-run': cannot be created"),  # read-only
    ("mora.train", ["run.dir=/proc"], "'/proc': cannot be written"),  # a folder that takes no files
    ("mora.launch", ["launcher=ddp", "train.lr=abc"], "'abc'"),
    ("mora.launch", ["launcher=nope"], "launcher/nope"),
    ("mora.launch", ["launcher=ddp", "launcher.num_processes=0"], "launcher.num_processes 0"),
    ("mora.launch", ["launcher=ddp", "train.global_batch=30"], "train.global_batch=30"),
    ("mora.launch", ["launcher=local"], "launcher=local"),
    ("mora.launch", ["launcher=ddp", "run.dir={file}"], "{file}"),
    ("mora.launch", ["launcher=ddp", "run.dir=/proc/mora-lab/run"], "'/proc/mora-lab/run': cannot be created"),
    (
        "mora.launch",
        ["launcher=ddp", "train.micro_batch=16", "adapter.target_modules=[nope]"],
        "['nope']",
    ),  # meta build
    ("mora.launch", ["launcher=deepspeed_zero2", "train.micro_batch=16", "adapter.target_modules=[nope]"], "['nope']"),
    ("mora.launch", ["launcher=ddp", "train.micro_batch=16", "task.n_pairs=abc"], "task.n_pairs 'abc'"),
    # found before spawning, where each process used to print it and the launcher its stack dump
    ("mora.launch", ["launcher=deepspeed_zero2", "train.micro_batch=16", "adapter=relora"], "adapter=relora"),
    ("mora.launch", ["launcher=ddp", "train.micro_batch=16", "model=llama2_7b"], "'meta-llama/Llama-2-7b-hf'"),
    ("mora.launch", ["launcher=ddp", "train.micro_batch=4", "task=metamath", "task.eval.limit=1"], "limit=1"),
    ("mora.train", ["task=metamath", "task.eval.columns=[gsm8k,nope]"], "'nope' is not a column"),
    ("mora.train", ["task=biomed", "task.block_size=1"], "task.block_size 1"),
    ("mora.train", ["task=tulu_v2", "task.eval.source=web"], "task.eval.source 'web'"),
    ("mora.train", ["task=c4", "task.from_scratch=maybe"], "task.from_scratch 'maybe'"),
    ("mora.inspect", ["adapter.r=0"], "adapter.r 0"),
    ("mora.inspect", ["model.dtype=fp8"], "'fp8'"),
    ("mora.inspect", ["model=nope"], "model/nope"),
    ("mora.inspect", ["adapter.nokey=3"], "adapter.nokey"),
    # a method PEFT ships, by config: a class that is none, an argument it lacks, a knob that does not fit the model
    ("mora.inspect", ["adapter=hira", "adapter.config_class=HyraConfig"], "adapter.config_class 'HyraConfig'"),
    ("mora.train", ["adapter=hira", "+adapter.args.rank=2"], "adapter.args.rank is not an argument of HiraConfig"),
    ("mora.train", ["adapter=c3a"], "do not fit LlamaForCausalLM (C3AConfig: The block size should be a factor"),
]


# run as a user runs them, in a fresh process: per entry point a group Hydra refuses, so that the whole way from the
# command line to the one line is the real one; the other cases call the same entry function in this process (a
# fresh process costs 7 to 10 s of imports, most of it PEFT's)
IN_A_FRESH_PROCESS = {
    ("mora.train", "adapter=nope"),
    ("mora.launch", "launcher=nope"),
    ("mora.inspect", "model=nope"),
}


def _entry(module: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The exit code and stderr of the module's command-line entry (`python -m module args`) in this process."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *args])
    if module == "mora.launch":
        from mora.launch import main

        code = main(args)
    else:
        with pytest.raises(SystemExit) as stopped:
            importlib.import_module(module).cli()
        code = stopped.value.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("module", "args", "named"), CASES, ids=[f"{m} {' '.join(a)}" for m, a, _ in CASES])
def test_a_bad_value_stops_with_one_line_naming_it_and_writes_nothing(
    tmp_path, monkeypatch, capsys, module, args, named
):
    file = tmp_path / "a_file"
    file.write_text("keep")
    runs = tmp_path / "runs"
    runs.mkdir()
    fresh = (module, " ".join(args)) in IN_A_FRESH_PROCESS
    args = [a.format(file=file) for a in args]
    if module != "mora.inspect":
        args.append(f"run.root={runs}")
    if fresh:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        command = [sys.executable, "-m", module, *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
        code, stderr = result.returncode, result.stderr
        assert "Traceback" not in result.stdout
    else:  # an exception other than the one-line exit fails the test here
        code, stderr = _entry(module, args, tmp_path, monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error: ") and named.format(file=file) in lines[-1], lines
    assert [p.name for p in runs.iterdir()] == [] and file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "runs"]


def test_some_cases_run_in_a_fresh_process():
    assert {(m, " ".join(a)) for m, a, _ in CASES} >= IN_A_FRESH_PROCESS


TABLE_CASES = [
    (["table2", "--set", "train.lr=abc"], "'abc'"),
    (["table2", "--set", "train.nokey=1"], "train.nokey"),
    (["table2", "--set", "train.warmup=-1"], "train.warmup -1"),
    (["table2", "--set", "lr"], "lr"),
    (["table9"], "table9"),
    (["table2", "--cells", "nope"], "nope"),
    (["table2", "--tasks", "c4"], "c4"),
    (["table2", "--jobs", "0"], "--jobs"),
    (["table2", "--profile", "huge"], "huge"),
    (["table2", "--seeds", "x"], "'x' (make: SEED / SEEDS)"),
    (["table2", "--profile", "gpu", "--launcher", "slurm"], "'slurm'"),
    (["table2", "--nproc", "two"], "'two' (make: NPROC)"),
    (["table2", "--runs", "/proc/mora-lab"], "'/proc/mora-lab/base': cannot be created"),
    (["methods", "--cells", "lora-r8", "--set", "task.shares.text=0"], "task.shares.text 0"),  # the base's mixture
]


@pytest.mark.parametrize(("args", "named"), TABLE_CASES, ids=[" ".join(a) for a, _ in TABLE_CASES])
def test_the_table_runner_stops_before_any_run_on_a_bad_value(tmp_path, capsys, args, named):
    out = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args]  # args' own --runs wins
    with pytest.raises(SystemExit) as stopped:
        sys.exit(reproduce(out))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert not (REPO_ROOT / "results" / "table9").exists()


@pytest.mark.parametrize("entry", ["mora.train", "mora.launch", "the table runner"])
def test_a_bad_mora_compile_stops_every_entry_point_before_anything_starts(tmp_path, monkeypatch, capsys, entry):
    # MORA_COMPILE is read by every MoRA layer at its first call: checked with the config, before any process or run
    monkeypatch.setenv("MORA_COMPILE", "fast")
    runs = tmp_path / "runs"
    if entry == "the table runner":
        with pytest.raises(SystemExit) as stopped:
            sys.exit(reproduce(["table4", "--runs", str(runs), "--out", str(tmp_path / "out")]))
        code, stderr = stopped.value.code, capsys.readouterr().err
    else:
        launcher = ["launcher=ddp", "train.micro_batch=16"] if entry == "mora.launch" else []
        code, stderr = _entry(entry, [*launcher, f"run.root={runs}"], tmp_path, monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and "Traceback" not in stderr
    assert lines[-1].startswith("error: MORA_COMPILE='fast' is not one of auto, on, off"), lines
    assert list(tmp_path.iterdir()) == []


def _without_wandb(tmp_path: Path) -> str:
    """A PYTHONPATH on which `import wandb` fails, as on a GPU node's own environment (the wheelhouse has none)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    return os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)])


def test_a_normal_tiny_run_prints_no_warning(tmp_path):
    # warnings that come from our own use of a library (deprecated calls, DeepSpeed left to guess the device): none;
    # DS_ACCELERATOR unset as on a fresh shell (the Makefile sets it); with W&B disabled, wandb need not be installed
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=_without_wandb(tmp_path))
    args = ["train.steps=2", "train.eval_steps=[2]", "train.progress=false", f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "mora.train", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "warn" not in output.lower(), output[-2000:]


def test_wandb_on_without_wandb_installed_stops_before_anything_is_written(tmp_path):
    # a GPU node's own environment (the wheelhouse has no wandb): the default wandb.mode=offline is one line at the
    # start, not an ImportError after the run folder was made (that disabled W&B runs there: the test above)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=_without_wandb(tmp_path))
    args = ["train.steps=2", "train.eval_steps=[2]", f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "mora.train", *args], capture_output=True, text=True, env=env)
    line = "error: wandb.mode=offline but wandb is not installed; pip install wandb, or set wandb.mode=disabled "
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line + "(WANDB_MODE=disabled)"]
    assert not (tmp_path / "run").exists()


def test_a_folder_that_another_runs_probe_removes_meanwhile_is_looked_at_again(tmp_path, monkeypatch):
    # the table runner's jobs check sibling run folders side by side, each making and removing the first missing
    # folder on its way: this one finds runs/, the other's probe removes it before this one makes runs/table3
    from mora import config

    (tmp_path / "runs").mkdir()
    made = []
    mkdir = os.mkdir

    def after_the_other_removed_runs(path, *args):
        if not made:
            (tmp_path / "runs").rmdir()
        made.append(Path(path))
        return mkdir(path, *args)

    monkeypatch.setattr(config.os, "mkdir", after_the_other_removed_runs)
    config.check_folder("run.dir", tmp_path / "runs" / "table3" / "lora-s7")  # no error: it looked again
    assert made == [tmp_path / "runs" / "table3", tmp_path / "runs"] and not (tmp_path / "runs").exists()


def test_a_run_folder_that_another_process_probes_meanwhile_is_never_taken_for_a_file(tmp_path, monkeypatch):
    # two processes of one run check the same new run.dir: the other's probe makes it and removes it again. Seen
    # between "it exists" and "it is a folder" that read as a file (a 2-process DeepSpeed run in CI failed so)
    from mora import config

    run_dir = tmp_path / "run"
    run_dir.mkdir()  # made by the other process's probe, which removes it before this one asks what it is
    is_dir = Path.is_dir

    def removed_meanwhile(path):
        if path == run_dir and run_dir.exists():
            run_dir.rmdir()
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", removed_meanwhile)
    config.check_folder("run.dir", run_dir)  # no error: it looked again
    assert not run_dir.exists()
