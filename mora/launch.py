"""Launch `python -m mora.train` on several processes as the `launcher` config group says, through
`accelerate launch` (README, Launchers: the recipes that work on CPU).

    python -m mora.launch launcher=ddp adapter=lora adapter.r=8                  # 2 processes, DDP
    python -m mora.launch launcher=deepspeed_zero2 launcher.num_processes=8 profile=paper experiment=table2 ...

The DeepSpeed json's "auto" values are filled from the run's config (global batch, micro-batch, accumulation,
clipping, precision) into a resolved copy next to a generated accelerate config, under runs/.launch/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from accelerate.utils.constants import DEEPSPEED_MULTINODE_LAUNCHERS
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mora.config import one_line
from mora.models import MissingAssetError
from mora.paths import CONFIG_DIR, REPO_ROOT


def resolved_deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The launcher's DeepSpeed json with every "auto" filled from the run config."""
    path = CONFIG_DIR / "launcher" / "deepspeed" / str(cfg.launcher.deepspeed_config)
    if not path.is_file():
        raise ValueError(f"launcher.deepspeed_config {cfg.launcher.deepspeed_config!r} is not in {path.parent}")
    ds = json.loads(path.read_text())
    overrides = cfg.launcher.get("deepspeed_overrides") or {}
    ds = OmegaConf.to_container(OmegaConf.merge(ds, overrides))  # e.g. offload or ZeRO-3 thresholds, per run
    t, world = cfg.train, cfg.launcher.num_processes * cfg.launcher.num_machines
    if t.global_batch % (t.micro_batch * world):
        raise ValueError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x {world} "
            "processes"
        )
    ds.update(
        train_batch_size=t.global_batch,
        train_micro_batch_size_per_gpu=t.micro_batch,
        gradient_accumulation_steps=t.global_batch // (t.micro_batch * world),
        gradient_clipping=float(t.max_grad_norm or 0.0),
    )
    ds["bf16"]["enabled"] = cfg.model.dtype == "bfloat16"
    ds["fp16"]["enabled"] = cfg.model.dtype == "float16"
    return ds


def command(cfg: DictConfig, overrides: list[str], workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for cfg.launcher."""
    launcher = cfg.launcher
    if launcher.name not in ("ddp", "deepspeed_zero2", "deepspeed_zero3"):
        raise ValueError(f"launcher={launcher.name} runs in this process: use `python -m mora.train` instead")
    if launcher.num_machines < 1 or not 0 <= launcher.machine_rank < launcher.num_machines:
        raise ValueError(
            f"launcher.machine_rank={launcher.machine_rank} must be in [0, launcher.num_machines="
            f"{launcher.num_machines})"
        )
    if launcher.num_machines > 1 and not launcher.main_process_ip:
        raise ValueError(
            f"launcher.num_machines={launcher.num_machines} needs launcher.main_process_ip (the address of the node "
            "with machine_rank 0)"
        )
    multinode = launcher.get("multinode_launcher", "standard")
    if multinode not in DEEPSPEED_MULTINODE_LAUNCHERS:
        raise ValueError(f"launcher.multinode_launcher={multinode!r} is not one of {DEEPSPEED_MULTINODE_LAUNCHERS}")
    env = dict(os.environ)
    base = [
        "--num_processes",
        str(launcher.num_processes * launcher.num_machines),
        "--num_machines",
        str(launcher.num_machines),
        "--machine_rank",
        str(launcher.machine_rank),
        "--main_process_port",
        str(launcher.main_process_port),
    ]
    if launcher.main_process_ip:
        base += ["--main_process_ip", str(launcher.main_process_ip)]
    if launcher.name == "ddp":
        if not _has_cuda():
            env["ACCELERATE_USE_CPU"] = "1"  # without it, `--multi_gpu` on CPU starts unsynchronised processes
        args = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", *base]  # the engine autocasts
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # it silently drops DeepSpeed
        env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
        workdir.mkdir(parents=True, exist_ok=True)
        ds_path = workdir / "deepspeed.json"
        ds_path.write_text(json.dumps(resolved_deepspeed_config(cfg), indent=2))
        acc_path = workdir / "accelerate.yaml"
        acc_path.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
            f"deepspeed_config:\n  deepspeed_config_file: {ds_path}\n  zero3_init_flag: false\n"
            f"  deepspeed_multinode_launcher: {multinode}\n"
            f"num_machines: {launcher.num_machines}\nnum_processes: {launcher.num_processes * launcher.num_machines}\n"
            f"machine_rank: {launcher.machine_rank}\nuse_cpu: false\nrdzv_backend: static\nsame_network: true\n"
        )
        args = ["--config_file", str(acc_path), *base]
    return [sys.executable, "-m", "accelerate.commands.launch", *args, "-m", "mora.train", *overrides], env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:  # every check before a process is spawned: a bad value is reported once, by this process
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        from mora.training.run import check_build, validate

        validate(cfg, int(cfg.launcher.num_processes) * int(cfg.launcher.get("num_machines", 1)))
        check_build(cfg)
        cmd, env = command(cfg, overrides, REPO_ROOT / cfg.run.root / ".launch" / str(os.getpid()))
    except (ValueError, MissingAssetError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
