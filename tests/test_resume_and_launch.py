"""Resume after SIGKILL, deterministic run folders, and the multi-process launcher (DDP / DeepSpeed over gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mora.launch import command, resolved_deepspeed_config
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.training.run import config_hash, run

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _train_records(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "tokens" in r]


COMMON = [
    "adapter=mora",
    "adapter.r=2",
    "adapter.dropout=0.1",
    "task.n_pairs=32",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.steps=12",
    "train.eval_steps=[6,12]",
    "train.log_every=1",
    "train.progress=false",
    "train.lr=1e-2",
]


def test_config_hash_names_the_numbers_not_the_folder():
    a = _compose(*COMMON)
    assert config_hash(a) == config_hash(_compose(*COMMON, "run.dir=/elsewhere", "train.progress=true"))
    assert config_hash(a) != config_hash(_compose(*COMMON, "train.lr=2e-2"))


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run(_compose(*COMMON, f"run.dir={reference}"))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mora.train", *COMMON, "train.checkpoint_every=3", f"run.dir={killed}"]
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-6" / "state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists() or json.loads((killed / "summary.json").read_text())["status"] != (
        "finished"
    )
    resumed = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] in (6, 9)
    expected, got = _train_records(reference), _train_records(killed)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(expected, got, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)
    ref_evals = json.loads((reference / "summary.json").read_text())["evals"]
    for a, b in zip(ref_evals, summary["evals"], strict=True):
        assert a["step"] == b["step"] and abs(a["eval/char_acc"] - b["eval/char_acc"]) <= 1e-6
    assert len(list((killed / "checkpoints").glob("step-*"))) <= 2


def test_launcher_commands(tmp_path):
    cfg = _compose("launcher=ddp", *COMMON)
    cmd, env = command(cfg, COMMON, tmp_path)
    assert cmd[-len(COMMON) - 2 :] == ["-m", "mora.train", *COMMON] and "--multi_gpu" in cmd
    assert env["ACCELERATE_USE_CPU"] == "1"
    cfg = _compose("launcher=deepspeed_zero2", *COMMON)
    cmd, env = command(cfg, COMMON, tmp_path)
    assert "ACCELERATE_USE_CPU" not in env and "--config_file" in cmd
    ds = json.loads((tmp_path / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert "mixed_precision" not in (tmp_path / "accelerate.yaml").read_text()
    paper = _compose("launcher=deepspeed_zero2", "launcher.num_processes=8", "profile=paper")
    ds = resolved_deepspeed_config(paper)
    assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 5 and ds["train_batch_size"] == 1000
    with pytest.raises(ValueError, match="not divisible"):
        resolved_deepspeed_config(_compose("launcher=deepspeed_zero2", "launcher.num_processes=3", *COMMON))
    with pytest.raises(ValueError, match="runs in this process"):
        command(_compose(*COMMON), COMMON, tmp_path)


PARITY = [
    "adapter=lora",
    "adapter.r=2",
    "adapter.dropout=0.0",
    "task.n_pairs=32",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.steps=4",
    "train.eval_steps=[4]",
    "train.log_every=1",
    "train.progress=false",
    "train.lr=1e-2",
    "train.checkpoint_every=0",
]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["ddp", "deepspeed_zero2"])
def test_two_processes_give_the_one_process_loss_curve(tmp_path, launcher):
    single = tmp_path / "single"
    run(_compose(*PARITY, f"run.dir={single}"))
    double = tmp_path / launcher
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mora.launch",
            f"launcher={launcher}",
            "launcher.num_processes=2",
            *PARITY,
            f"run.dir={double}",
            "launcher.main_process_port=29517",
        ],
        cwd=REPO_ROOT,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    one, two = _train_records(single), _train_records(double)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert abs(one[0]["train/loss"] - two[0]["train/loss"]) <= 1e-6
    for a, b in zip(one, two, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-3, (a, b)
