"""run(cfg): one training run as a self-describing folder (STYLE.md).

    runs/<experiment>/<method>-r<r>-s<seed>-<time>/
      config.yaml  env.json  metrics.jsonl  adapter/  summary.json (also on failure)

The user sets the global batch; micro-batch x processes x accumulation derive from it. The loss is normalised per
label token over the whole global batch, so 1 process and N processes (or any accumulation) give the same update.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mora.adapters.build import METHODS, build_adapter
from mora.models import build_model, ensure_local
from mora.paths import REPO_ROOT
from mora.tasks.uuid import UuidTask, char_tokenizer, collate
from mora.training.restarts import jagged_factor, schedule_factor

TASKS = ("uuid",)


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Every check that needs no model: one clear ValueError per bad value, before any work."""
    if cfg.adapter.method not in METHODS:
        raise ValueError(f"unknown adapter.method {cfg.adapter.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.adapter.method != "fft":
        r = cfg.adapter.r
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"adapter.r must be a positive integer, got {r!r}")
    if cfg.task.name not in TASKS:
        raise ValueError(f"unknown task {cfg.task.name!r}; this engine runs {', '.join(TASKS)}")
    t = cfg.train
    if not t.lr > 0:
        raise ValueError(f"train.lr must be positive, got {t.lr}")
    if t.steps <= 0:
        raise ValueError(f"train.steps must be positive, got {t.steps}")
    if t.global_batch % (t.micro_batch * world_size):
        raise ValueError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
            f"{world_size} processes; choose a global batch that is a multiple of {t.micro_batch * world_size}"
        )
    bad_steps = [s for s in t.eval_steps if not 0 < s <= t.steps]
    if bad_steps:
        raise ValueError(f"train.eval_steps {bad_steps} fall outside 1..train.steps={t.steps}")


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model's own tokenizer for a hub / local model; the project's character tokenizer for random-init ones."""
    if not cfg.model.pretrained:
        return char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(ensure_local(str(cfg.model.pretrained), "tokenizer"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def run_dir(cfg: DictConfig, accelerator: Accelerator) -> Path:
    """The run folder, decided on rank 0 and broadcast (every rank writes to the same place)."""
    if cfg.run.dir:
        path = Path(str(cfg.run.dir))
    else:
        a = cfg.adapter
        rank = f"-r{a.r}" if a.method != "fft" else ""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = REPO_ROOT / cfg.run.root / str(cfg.run.experiment) / f"{a.method}{rank}-s{cfg.seed}-{stamp}"
    chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    path = Path(chosen[0])
    summary = path / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
        raise ValueError(f"run.dir {path} already holds a finished run; choose another run.dir or delete it")
    return path


def make_accelerator() -> Accelerator:
    # On CPU, accelerate + DeepSpeed needs an explicit gloo group (ENV-NOTES.md §3).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    return Accelerator(kwargs_handlers=kwargs)


def environment(accelerator: Accelerator) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "cpus": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }


def lr_factor(cfg: DictConfig, restarts_every: int | None, restart_warmup: int):
    t = cfg.train
    if restarts_every:
        return lambda step: jagged_factor(t.schedule, step, t.warmup, t.steps, restarts_every, restart_warmup)
    return lambda step: schedule_factor(t.schedule, step, t.warmup, t.steps)


class MetricsLog:
    """metrics.jsonl: one JSON object per event (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of a micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train cfg.adapter on cfg.task with cfg.model; returns the summary (also written to summary.json)."""
    accelerator = make_accelerator()
    validate(cfg, accelerator.num_processes)
    out = run_dir(cfg, accelerator)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (out / "env.json").write_text(json.dumps(environment(accelerator), indent=2))
        (out / "metrics.jsonl").unlink(missing_ok=True)
    summary: dict[str, Any] = {"status": "running", "method": cfg.adapter.method, "seed": cfg.seed}
    started = time.time()
    try:
        summary.update(_train(cfg, accelerator, out, MetricsLog(out / "metrics.jsonl", main)))
        summary["status"] = "finished"
    except BaseException as error:
        summary.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        summary["wall_s"] = round(time.time() - started, 2)
        summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(cfg: DictConfig, accelerator: Accelerator, out: Path, log: MetricsLog) -> dict[str, Any]:
    t = cfg.train
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    task = UuidTask(cfg.task.n_pairs, cfg.task.data_seed, tokenizer)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not model_cfg.get("pretrained"):
        model_cfg["config"]["vocab_size"] = len(tokenizer)
    model = build_model(model_cfg, seed=cfg.seed)
    adapted = build_adapter(model, cfg.adapter, seed=cfg.seed)
    optimizer = adapted.optimizer(lr=t.lr, weight_decay=t.weight_decay)
    restarts = adapted.restarts
    factor = lr_factor(cfg, restarts.every if restarts else None, restarts.warmup if restarts else 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model, optimizer = accelerator.prepare(adapted.model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accumulation = t.micro_batch, t.global_batch // (t.micro_batch * world)

    eval_steps = set(t.eval_steps)
    history: list[dict[str, Any]] = []
    batches = task.batches(0, t.global_batch, cfg.seed)
    tokens_seen, loss_value = 0, math.nan
    bar = tqdm(total=t.steps, disable=not accelerator.is_main_process or not t.progress, desc=str(out.name))
    clock = time.time()
    for step in range(t.steps):
        examples = next(batches)
        full = collate(examples, tokenizer.pad_token_id)
        n_tokens = int((full["labels"][:, 1:] != -100).sum())  # label tokens of the whole global batch
        mine = examples[rank * micro * accumulation : (rank + 1) * micro * accumulation]
        loss_sum = torch.zeros((), device=accelerator.device)
        model.train()
        for i in range(accumulation):
            batch = collate(mine[i * micro : (i + 1) * micro], tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = nullcontext() if i == accumulation - 1 else accelerator.no_sync(model)
            with sync:
                part = token_loss_sum(model, batch)
                # DDP averages gradients over ranks: scale by world so the update is sum / n_tokens
                accelerator.backward(part * world / n_tokens)
            loss_sum += part.detach()
        if t.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if restarts and restarts.due(done, t.steps):
            restarts.restart(accelerator.unwrap_model(model), optimizer)
            log.write({"step": done, "event": "restart"})
        loss_value = float(accelerator.reduce(loss_sum, reduction="sum")) / n_tokens
        tokens_seen += int(full["attention_mask"].sum())
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.time() - clock
            log.write(
                {
                    "step": done,
                    "tokens": tokens_seen,
                    "train/loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "time_s": round(elapsed, 3),
                }
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if done in eval_steps:
            metrics = task.evaluate(accelerator.unwrap_model(model), t.eval_batch)
            record = {"step": done, **{f"eval/{k}": v for k, v in metrics.items()}, "train/loss": loss_value}
            history.append(record)
            log.write(record)
    bar.close()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out / "adapter")
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "rank": None if cfg.adapter.method == "fft" else cfg.adapter.r,
        "compression": cfg.adapter.get("compression"),
        "lr": t.lr,
        "steps": t.steps,
        "global_batch": t.global_batch,
        "world_size": world,
        "accumulation": accumulation,
        "trainable_params": adapted.trainable_parameters(),
        "final_train_loss": loss_value,
        "tokens": tokens_seen,
        "tokens_per_s": round(tokens_seen / max(time.time() - clock, 1e-9), 1),
        "evals": history,
    }
