"""The table runner's jobs through submitit (`--submit slurm|local`): the SLURM settings and commands a dry run
prints, the sbatch script they make, and a tiny table whose runs go as jobs on this machine (submitit's local
executor runs the same jobs SLURM would)."""

import json
import os

import pytest

from experiments.reproduce import executor, main, slurm_parameters

SMALL = ["train.steps=2", "train.eval_steps=[2]", "task.n_pairs=8", "train.global_batch=4", "train.micro_batch=4"]


def test_a_slurm_dry_run_prints_the_job_settings_and_each_runs_mora_launch(capsys, tmp_path):
    args = ["table1", "--profile", "paper", "--tasks", "metamath", "--cells", "mora-r8", "--submit", "slurm"]
    args += ["--slurm", "partition=gpu", "gpus_per_node=4", "--dry-run", "--runs", str(tmp_path / "runs")]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    settings = json.loads(lines[0].split(": ", 1)[1])
    assert settings["partition"] == "gpu" and settings["gpus_per_node"] == 4 and settings["time"] == 1440
    assert len(lines) == 3  # the settings, then mora-r8 at its 2 learning rates for MetaMath
    for line in lines[1:]:
        assert " -m mora.launch launcher=deepspeed_zero2 launcher.num_processes=4 " in line  # NPROC: the node's GPUs
    assert list(tmp_path.iterdir()) == []


def test_the_sbatch_script_holds_the_settings(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    params = slurm_parameters(["partition=gpu", "time=90", "mem_gb=200", "setup=[module load cuda]", "qos=high"])
    text = executor("slurm", params, tmp_path / "jobs")._executor._make_submission_file_text("CMD", "0")
    for line in ("--partition=gpu", "--time=90", "--mem=200GB", "--qos=high", "--gpus-per-node=8", "--nodes=1"):
        assert f"#SBATCH {line}\n" in text, line
    assert "#SBATCH --ntasks-per-node=1\n" in text and "\nmodule load cuda\n" in text and text.rstrip().endswith("CMD")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--submit", "slurm", "--slurm", "partiton=gpu"], "['partiton=gpu']"),
        (["--submit", "slurm", "--slurm", "time=abc"], "time=abc"),
        (["--submit", "slurm", "--slurm", "gpus_per_node=-1"], "gpus_per_node=-1"),
        (["--slurm", "time=3"], "--submit"),
        (["--submit", "slurm", "--launcher", "in-process"], "in-process"),
        (["--submit", "slurm"], "sbatch"),  # no SLURM on PATH
    ],
)
def test_bad_job_settings_stop_with_one_line(args, named, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        main(["table2", *args, "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and named in err[0] and "(make: " in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_tiny_table_runs_as_jobs_through_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["table2", "--submit", "local", "--slurm", "gpus_per_node=0", "time=10", "--cells", "fft"]
    assert main([*args, "--seeds", "0", "--runs", str(runs), "--out", str(out), "--set", *SMALL]) == 0
    folders = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
    assert folders == ["base", "fft-lr0.001-s0"]  # the cell's job waits for the base model's
    for name in folders:
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 2
    logs = list((runs / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == len(folders)  # one job a run, the base first
    assert (out / "table2.md").is_file()
    assert main([*args, "--seeds", "0", "--runs", str(runs), "--out", str(out), "--set", *SMALL]) == 0  # all done
    assert len(list((runs / ".submitit").glob("*/*_0_log.out"))) == len(folders)  # nothing submitted again
