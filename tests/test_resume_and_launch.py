"""Resume after SIGKILL, deterministic run folders, and the multi-process launcher (DDP / DeepSpeed over gloo)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mora.launch import command, resolved_deepspeed_config
from mora.models import build_model
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.tasks import task_tokenizer
from mora.tasks.uuid import char_tokenizer
from mora.training.run import config_hash, run
from tests.conftest import HANG_S

ZERO2 = CONFIG_DIR / "launcher" / "deepspeed" / "zero2.json"
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _killed_at(step: int) -> dict[str, str]:
    """The environment of a run that SIGKILLs its process group once step `step` is logged (tests/hooks)."""
    hooks = os.pathsep.join(filter(None, (str(Path(__file__).parent / "hooks"), ENV.get("PYTHONPATH"))))
    return {**ENV, "PYTHONPATH": hooks, "MORA_TEST_KILL_AT_STEP": str(step)}


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
    # killed at step 8, after its checkpoint of step 6: the records of steps 7 and 8 must be dropped on resume
    killer = _killed_at(8)
    process = subprocess.run(
        cmd, cwd=REPO_ROOT, env=killer, capture_output=True, start_new_session=True, timeout=HANG_S
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert [r["step"] for r in _train_records(killed)] == list(range(1, 9))
    assert not (killed / "summary.json").exists() or json.loads((killed / "summary.json").read_text())["status"] != (
        "finished"
    )
    resumed = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == 6
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
    bad = {
        "launcher.machine_rank=2": "machine_rank=2 must be in",
        "launcher.num_machines=2": "needs launcher.main_process_ip",
        "launcher.multinode_launcher=ssh": "multinode_launcher='ssh' is not one of",
    }
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            command(_compose("launcher=deepspeed_zero3", *COMMON, override), COMMON, tmp_path)
    two_nodes = [
        "launcher.num_machines=2",
        "launcher.num_processes=1",
        "launcher.machine_rank=1",
        "launcher.main_process_ip=10.0.0.1",
    ]
    cmd, _ = command(_compose("launcher=deepspeed_zero3", *COMMON, *two_nodes), COMMON, tmp_path)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert "deepspeed_multinode_launcher: standard" in (tmp_path / "accelerate.yaml").read_text()
    offload = "launcher.deepspeed_overrides={zero_optimization:{offload_optimizer:{device:cpu}}}"
    ds = resolved_deepspeed_config(_compose("launcher=deepspeed_zero2", *COMMON, offload))
    assert ds["zero_optimization"] == {
        **json.loads(ZERO2.read_text())["zero_optimization"],
        "offload_optimizer": {"device": "cpu"},
    }


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


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory) -> Path:
    """A tiny LLaMA saved like a hub model: every launcher starts from the same weights (ZeRO-3 builds a random-init
    model partitioned under deepspeed.zero.Init, which draws different numbers than one process does)."""
    folder = tmp_path_factory.mktemp("base")
    cfg = _compose()
    tokenizer = char_tokenizer()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["config"]["vocab_size"] = len(tokenizer)
    build_model(model_cfg, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def metamath_base(tmp_path_factory) -> Path:
    """A tiny LLaMA with MetaMath's fixture tokenizer, saved like a hub model (see pretrained_base)."""
    folder = tmp_path_factory.mktemp("metamath-base")
    cfg = _compose("task=metamath")
    tokenizer = task_tokenizer(cfg.task)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["config"]["vocab_size"] = len(tokenizer)
    build_model(model_cfg, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _launch(
    launcher: str, overrides: list[str], port: int, machines: int = 1, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """`python -m mora.launch` once per machine (all on this host, as on a cluster with a shared filesystem), each
    in a process group of its own with its ranks."""
    per_machine = 2 // machines
    common = [f"launcher={launcher}", f"launcher.num_processes={per_machine}", f"launcher.num_machines={machines}"]
    if machines > 1:
        common.append("launcher.main_process_ip=127.0.0.1")
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mora.launch",
                *common,
                f"launcher.machine_rank={rank}",
                f"launcher.main_process_port={port}",
                *overrides,
            ],
            cwd=REPO_ROOT,
            env={**(env or ENV), "OMP_NUM_THREADS": "1"},
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(machines)
    ]


def _wait(processes: list[subprocess.Popen], timeout: float = HANG_S) -> str:
    """Every launcher's output, once each has exited with 0."""
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, output[-4000:]
        outputs.append(output)
    return "".join(outputs)


def _adapter_tensors(folder: Path) -> dict:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "launcher,machines",
    # ZeRO-2 on one machine: the text-task test below (DDP: the rehearsal's runs); here on two (a rank each)
    [("deepspeed_zero3", 1), ("ddp", 2), ("deepspeed_zero2", 2)],
)
def test_two_processes_give_the_one_process_loss_curve(tmp_path, pretrained_base, launcher, machines):
    # 33 pairs scored in batches of 16: the processes get 17 and 16, so the second has a batch with no pair left
    overrides = [*PARITY, "task.n_pairs=33", "train.eval_batch=16", f"model.pretrained={pretrained_base}"]
    launch_only = []
    if launcher == "deepspeed_zero3":  # partition every parameter, however small (the default keeps < 1e5 whole)
        launch_only.append("launcher.deepspeed_overrides={zero_optimization:{stage3_param_persistence_threshold:0}}")
    single = tmp_path / "single"
    run(_compose(*overrides, f"run.dir={single}"))
    double = tmp_path / f"{launcher}-{machines}"
    output = _wait(_launch(launcher, [*overrides, *launch_only, f"run.dir={double}"], port=29517 + machines))
    # DeepSpeed on a CPU compiles its shared-memory all-reduce kernel (90 s, once per machine) unless told not to
    assert "deepspeed_shm_comm" not in output, output[-4000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    one, two = _train_records(single), _train_records(double)
    evals = [json.loads((d / "summary.json").read_text())["evals"][-1] for d in (single, double)]
    assert evals[1]["eval/char_acc"] == pytest.approx(evals[0]["eval/char_acc"], abs=1e-9), evals
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert abs(one[0]["train/loss"] - two[0]["train/loss"]) <= 1e-6
    for a, b in zip(one, two, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-3, (a, b)
    # the saved adapter is whole (ZeRO-3 gathers its partitions) and holds the same weights
    want, got = _adapter_tensors(single), _adapter_tensors(double)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and torch.allclose(got[name], tensor, atol=1e-3), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["deepspeed_zero2", "deepspeed_zero3"])  # DDP: the rehearsal's Tülu v2 run
def test_a_text_task_on_two_processes_trains_and_evaluates_as_on_one(tmp_path, metamath_base, launcher):
    """MetaMath on its fixture, evaluated through lm-eval data-parallel: 3 documents a benchmark split over the 2
    processes (one padded), gathered on process 0, whose scores the engine takes; under ZeRO-3 with every weight
    partitioned, so that both processes must run the same forwards and generation steps."""
    overrides = [
        "task=metamath",
        "adapter=mora",
        "adapter.r=2",
        "adapter.dropout=0",
        "train.epochs=null",
        "train.steps=4",
        "train.eval_steps=[4]",
        "train.global_batch=8",
        "train.log_every=1",
        "train.progress=false",
        "task.eval.limit=3",
        "task.eval.batch_size=1",  # one forward a request group: unequal counts would hang ZeRO-3
        "task.eval.gen_kwargs={max_gen_toks:8}",
        "task.eval.columns=[gsm8k,mmlu_0,mmlu_5]",  # generation, multiple choice; 0 and 5 shots: two lm-eval calls
        f"model.pretrained={metamath_base}",  # the same weights on every launcher (ZeRO-3 draws its own otherwise)
    ]
    single = tmp_path / "single"
    run(_compose(*overrides, "train.micro_batch=8", f"run.dir={single}"))
    double = tmp_path / launcher
    launch_only = ["train.micro_batch=4"]
    if launcher == "deepspeed_zero3":
        launch_only.append("launcher.deepspeed_overrides={zero_optimization:{stage3_param_persistence_threshold:0}}")
    _wait(_launch(launcher, [*overrides, *launch_only, f"run.dir={double}"], port=29561))
    one, two = (json.loads((d / "summary.json").read_text()) for d in (single, double))
    assert two["status"] == "finished" and two["world_size"] == 2 and two["data_hash"] == one["data_hash"]
    for a, b in zip(_train_records(single), _train_records(double), strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-3, (a, b)
    assert two["evaluation"]["scores"] == pytest.approx(one["evaluation"]["scores"])
    details = one["evaluation"]["details"], two["evaluation"]["details"]
    assert [d["processes"] for d in details] == [1, 2]
    assert details[1]["benchmarks"]["gsm8k"]["n"] == 3
    assert {b["num_fewshot"] for b in details[1]["benchmarks"].values()} == {0, 5} and "mmlu_5" in two["evaluation"][
        "scores"
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher,port", [("deepspeed_zero2", 29531), ("deepspeed_zero3", 29541)])
def test_deepspeed_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, pretrained_base, launcher, port):
    steps = ["train.steps=12", "train.eval_steps=[12]", "train.checkpoint_every=4"]
    overrides = [*COMMON, *steps, f"model.pretrained={pretrained_base}"]
    if launcher == "deepspeed_zero3":  # partition every parameter (see the parity test)
        overrides.append("launcher.deepspeed_overrides={zero_optimization:{stage3_param_persistence_threshold:0}}")
    killed = tmp_path / "killed"
    # the launcher and both ranks at once, as when a node dies, at step 11: after the checkpoint of step 8. Up to
    # its kill the run is an uninterrupted one: the resumed run must give its steps 9-11 again, to the bit
    first = _launch(launcher, [*overrides, f"run.dir={killed}"], port=port, env=_killed_at(11))[0]
    output, _ = first.communicate(timeout=HANG_S)
    assert first.returncode == -signal.SIGKILL, output[-4000:]
    uninterrupted = _train_records(killed)
    assert [r["step"] for r in uninterrupted] == list(range(1, 12))
    assert not (killed / "summary.json").exists(), "the run was not killed before it ended"
    _wait(_launch(launcher, [*overrides, f"run.dir={killed}"], port=port + 1))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == 8
    got = _train_records(killed)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(uninterrupted, got[:11], strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)
        assert (a["lr"], a["tokens"]) == (b["lr"], b["tokens"]), (a, b)


def test_several_processes_wait_hours_at_a_collective_and_use_gloo_on_cpu():
    # process 0 prepares a task's data while the others wait: NCCL's 10-minute default would kill them
    from mora.training.run import PROCESS_GROUP_TIMEOUT, process_group_kwargs

    assert process_group_kwargs(1, cuda=True) == process_group_kwargs(1, cuda=False) == []
    (gpu,), (cpu,) = process_group_kwargs(8, cuda=True), process_group_kwargs(2, cuda=False)
    assert gpu.to_kwargs() == {"timeout": PROCESS_GROUP_TIMEOUT} and PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600
    assert cpu.to_kwargs() == {"backend": "gloo", "timeout": PROCESS_GROUP_TIMEOUT}
