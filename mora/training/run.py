"""run(cfg): one training run as a self-describing folder (STYLE.md).

    runs/<experiment>/<method>-r<r>-s<seed>-<config hash>/
      config.yaml  env.json  metrics.jsonl  checkpoints/  adapter/  summary.json (also on failure)

The folder name is a function of the resolved config, so the same command finds the same folder: a killed run
started again resumes from its last complete checkpoint; a finished one is refused, never overwritten.

The user sets the global batch; micro-batch x processes x accumulation derive from it. The loss is normalised per
label token over the whole global batch, so 1 process and N processes (or any accumulation) take the same update.
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mora.adapters import compiled
from mora.adapters.build import METHODS, Adapted, build_adapter, method_name
from mora.adapters.peft_tuner import MoraLayer
from mora.config import check
from mora.evaluation.merge import merge_check
from mora.evaluation.spectrum import adapted_layers, initial_weights, iter_delta_weights, spectrum
from mora.models import build_model, ensure_local
from mora.paths import REPO_ROOT
from mora.provenance import commit
from mora.tasks import Task, build_task, check_sections, task_tokenizer
from mora.training.memory import peak_memory_mb, reset_peak_memory
from mora.training.restarts import Restarts, jagged_factor, restarts_of, schedule_factor

CHECKPOINT_STATE = "state.json"  # written last: a checkpoint folder without it is incomplete
# train settings added after runs were recorded, at the value that keeps the earlier behaviour: left out of the
# config hash, so that finished runs of earlier versions are still found
NEUTRAL_TRAIN_SETTINGS = {"spectrum": False, "mixed_precision": None, "merge_check": False, "modules_to_save_lr": None}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: DictConfig, world: int = 1) -> None:
    """Every check that needs no model, before any work: the types and ranges of every value
    (mora.config.check, which also checks the run folder), then the rules across values. One clear
    ValueError per bad value."""
    check(cfg)
    compiled.setting()  # MORA_COMPILE, which every MoRA layer reads at its first call
    if cfg.adapter.method not in METHODS:
        raise ValueError(f"unknown adapter.method {cfg.adapter.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.adapter.method != "fft" and cfg.adapter.get("r") is None:
        raise ValueError(f"adapter.r None: adapter={cfg.adapter.method} needs a rank; give adapter.r, e.g. adapter.r=8")
    check_sections(cfg.task)
    if cfg.task.get("from_scratch") and cfg.model.get("pretrained"):
        raise ValueError(
            f"task {cfg.task.name} pretrains from scratch but model.pretrained={cfg.model.pretrained}; choose a "
            "model built from config (model=llama_250m, model=llama_1b) or set model.pretrained=null"
        )
    t = cfg.train
    if t.get("epochs") is None and t.steps is None:
        raise ValueError("train.steps None: with train.epochs null the steps count; give train.steps, e.g. 100")
    if t.global_batch % (t.micro_batch * world):
        raise ValueError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
            f"{world} processes; choose a global batch that is a multiple of {t.micro_batch * world}"
        )
    if t.get("epochs") is None:
        check_eval_steps(t.eval_steps, t.steps)
    precision = t.get("mixed_precision")
    deepspeed = str(cfg.launcher.name).startswith("deepspeed")
    if precision and deepspeed:
        raise ValueError(
            f"train.mixed_precision={precision} is for launcher=ddp or local; under DeepSpeed the precision follows "
            "model.dtype (its bf16 / fp16 with fp32 master weights)"
        )
    limit = (cfg.task.get("eval") or {}).get("limit")
    if limit is not None and limit < world:  # lm-eval splits the documents over the processes
        raise ValueError(
            f"task.eval.limit={limit} is below the {world} processes: lm-eval gives each process its share of a "
            f"benchmark's documents, and a process with none fails; give task.eval.limit >= {world} or null"
        )
    saved_lr, method = t.get("modules_to_save_lr"), cfg.adapter.method
    if saved_lr is not None and (method in ("fft", "loraplus") or not cfg.adapter.get("modules_to_save")):
        why = {"fft": "trains every weight", "loraplus": "sets its own LR groups"}.get(method, "has none")
        raise ValueError(
            f"train.modules_to_save_lr={saved_lr} is the LR of adapter.modules_to_save, and adapter={method} {why}; "
            "name the modules in adapter.modules_to_save (a method other than fft, loraplus) or set it to null"
        )
    if cfg.adapter.get("restart") is not None and deepspeed:
        raise ValueError(
            f"adapter={cfg.adapter.method} restarts reset M / optimizer state, which DeepSpeed keeps in its own "
            "partitions; run it with launcher=ddp or local"
        )
    for key in ("spectrum", "merge_check"):
        if t.get(key) and deepspeed and "zero3" in str(cfg.launcher.name):
            raise ValueError(f"train.{key} reads every weight on process 0, which ZeRO-3 partitions; use ZeRO-2 or DDP")
    if wandb_mode(cfg) != "disabled" and importlib.util.find_spec("wandb") is None:  # a GPU node's own environment
        raise ValueError(
            f"wandb.mode={wandb_mode(cfg)} but wandb is not installed; pip install wandb, or set wandb.mode=disabled "
            "(WANDB_MODE=disabled)"
        )


def check_build(cfg: DictConfig) -> None:
    """The model with its adapter on the meta device, no weights read, and a pretrained model's files in the local
    cache where the machine is offline: a target module the model lacks, a shape the operator refuses or a model
    never fetched is found before a launcher spawns any process (a process would report it once each)."""
    if cfg.model.get("pretrained"):
        ensure_local(str(cfg.model.pretrained))
    build_adapter(build_model(OmegaConf.to_container(cfg.model, resolve=True), meta=True), cfg.adapter)


def check_eval_steps(eval_steps: list[int], steps: int) -> None:
    bad = [s for s in eval_steps if not 0 <= s <= steps]
    if bad:
        raise ValueError(f"train.eval_steps {bad} fall outside 0..{steps} (0: before training; the run's steps)")


def total_steps(train: DictConfig, examples: int) -> int:
    """train.steps, or with train.epochs set, epochs x the full global batches of one epoch."""
    if train.get("epochs") is None:
        return int(train.steps)
    steps = int(train.epochs * (examples // train.global_batch))
    if steps <= 0:
        raise ValueError(
            f"train.epochs={train.epochs} of {examples} examples at train.global_batch={train.global_batch} is no "
            "full step; lower the global batch or add data"
        )
    return steps


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the run's numbers (everything but run.*, train.progress, wandb.* and the experiment's
    description of its table: table, grid, base, all_cells)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("run", "wandb", "table", "grid", "base", "all_cells"):
        data.pop(key, None)
    data["train"].pop("progress", None)
    for key, neutral in NEUTRAL_TRAIN_SETTINGS.items():
        if data["train"].get(key, neutral) == neutral:
            data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(cfg: DictConfig, accelerator: Accelerator) -> Path:
    """The run folder, decided on rank 0 and broadcast (every rank writes to the same place)."""
    if cfg.run.dir:
        path = Path(str(cfg.run.dir))
    else:
        a = cfg.adapter
        rank = f"-r{a.r}" if a.method != "fft" else ""
        name = f"{method_name(a)}{rank}-s{cfg.seed}-{config_hash(cfg)}"
        path = REPO_ROOT / cfg.run.root / str(cfg.run.experiment) / name
    chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    path = Path(chosen[0])
    summary = path / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
        raise ValueError(f"run.dir {path} already holds a finished run; choose another run.dir or delete it")
    return path


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The model's own tokenizer for a hub / local model; the task's tokenizer for a model built from config."""
    if not cfg.model.pretrained:
        return task_tokenizer(cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(ensure_local(str(cfg.model.pretrained), "tokenizer"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# How long a process waits at a collective. Process 0 prepares a task's data while the others wait
# (main_process_first): the first time, 1M MetaMath or 326k Tülu examples, or 1.3B tokens of continual pretraining,
# take longer than NCCL's and DeepSpeed's 10-minute default, after which the waiting processes are killed.
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


def process_group_kwargs(world: int, cuda: bool) -> list[InitProcessGroupKwargs]:
    """The process group's settings: a long timeout wherever there are several processes, and on CPU the gloo
    backend, which accelerate + DeepSpeed need there (measured: LOG.md); in one process no group at all."""
    if world <= 1:
        return []
    return [InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT, **({} if cuda else {"backend": "gloo"}))]


def skip_deepspeeds_shared_memory_kernel() -> None:
    """DeepSpeed on a CPU compiles a shared-memory all-reduce kernel at its first process group: 90 s on 2 cores, once
    per machine (measured: LOG.md). Only its tensor-parallel inference calls it (`inference_all_reduce`); training
    reduces through the gloo group, so a CPU run goes without it."""
    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute `deepspeed.comm.torch` is PyTorch
    backend.build_shm_op = lambda: None


def make_accelerator(accumulation: int) -> Accelerator:
    kwargs = process_group_kwargs(world_size(), torch.cuda.is_available())
    if torch.accelerator.current_accelerator() is None:
        # accelerate's unwrap_model imports DeepSpeed where it is installed, and DeepSpeed, left to detect the
        # device, warns on every machine without one that it chose the CPU: say so (noise, not a problem)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            skip_deepspeeds_shared_memory_kernel()
    return Accelerator(gradient_accumulation_steps=accumulation, kwargs_handlers=kwargs)


def environment(accelerator: Accelerator) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    sha, dirty = commit()
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        # MoRA's path: MORA_COMPILE, and whether it wants the compiled path on this device (a layer that ZeRO-3 or
        # offload hooks gather still runs eager: MoraLinear._path)
        "mora_compile": compiled.setting(),
        "mora_compiled": compiled.wanted(accelerator.device),
    }


def lr_factor(cfg: DictConfig, steps: int, restarts_every: int | None, restart_warmup: int):
    t = cfg.train
    if restarts_every:
        return lambda step: jagged_factor(t.schedule, step, t.warmup, steps, restarts_every, restart_warmup)
    return lambda step: schedule_factor(t.schedule, step, t.warmup, steps)


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and, if enabled, W&B; rank 0 only."""

    def __init__(self, path: Path, enabled: bool, wandb_run: Any = None) -> None:
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """On resume: drop what a killed run logged after its checkpoint; return what is kept."""
        if not self.path.exists():
            return []
        kept = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= step]
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of a micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def wandb_mode(cfg: DictConfig) -> str:
    """WANDB_MODE where set, else wandb.mode."""
    return os.environ.get("WANDB_MODE") or str(cfg.wandb.mode)


def start_wandb(cfg: DictConfig, out: Path, main: bool) -> Any:
    """A W&B run on rank 0 (offline unless wandb.mode=online), grouped by sweep / experiment."""
    if not main or wandb_mode(cfg) == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        group=cfg.wandb.group or str(cfg.run.experiment),
        name=out.name,
        id=f"{out.parent.name}-{out.name}"[-128:].replace("/", "-"),
        resume="allow",
        dir=str(out),
        mode=wandb_mode(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train cfg.adapter on cfg.task with cfg.model; returns the summary (also written to summary.json)."""
    world = world_size()
    validate(cfg, world)
    compiled.forget_graphs()  # graphs of a run before this one in the same process (a Hydra multirun)
    accelerator = make_accelerator(cfg.train.global_batch // (cfg.train.micro_batch * world))
    reset_peak_memory(accelerator.device)  # this run's peak, also in a process that ran others before
    out = run_dir(cfg, accelerator)
    built = prepare(cfg, accelerator)  # every error found while building comes before anything is written
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (out / "env.json").write_text(json.dumps(environment(accelerator), indent=2))
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"status": "running", "method": method_name(cfg.adapter), "seed": cfg.seed}
    started = time.time()
    # from the process's start: imports, config, device, model and data (one process per run on GPUs pays it)
    summary["startup_s"] = round(started - psutil.Process().create_time(), 2)
    wandb_run = start_wandb(cfg, out, main)
    try:
        summary.update(_train(cfg, accelerator, out, MetricsLog(out / "metrics.jsonl", main, wandb_run), built))
        summary["status"] = "finished"
    except BaseException as error:
        summary.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        summary["wall_s"] = round(time.time() - started, 2)
        summary.update(peak_memory_mb(accelerator.device))
        if compiled.compile_failure() is not None:  # MORA_COMPILE=auto fell back to the eager path (env.json: wanted)
            summary["mora_compile_failure"] = compiled.compile_failure()
        if main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if summary["status"] == "finished" else 1)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: a rank exiting with gloo's threads alive can abort
    return summary


def latest_checkpoint(out: Path) -> Path | None:
    complete = [p for p in (out / "checkpoints").glob("step-*") if (p / CHECKPOINT_STATE).exists()]
    return max(complete, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, out: Path, step: int, extra: dict) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + our state, written to a temp folder then renamed, so
    a kill at any moment leaves the previous checkpoint intact. Keeps the last two."""
    root = out / "checkpoints"
    tmp, final = root / f"tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # DeepSpeed: every rank's shards are written before the folder is renamed
    if accelerator.is_main_process:
        compressions = {
            name: dict(layer.mora_compression)
            for name, layer in accelerator.unwrap_model(model).named_modules()
            if isinstance(layer, MoraLayer)
        }
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, "compressions": compressions, **extra}))
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))[:-2]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> dict[str, Any]:
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    layers = dict(accelerator.unwrap_model(model).named_modules())
    for name, compressions in state["compressions"].items():
        for adapter, compression in compressions.items():
            layers[name].set_compression(adapter, compression)
    accelerator.load_state(str(path))
    return state


@dataclass
class Prepared:
    """What a run builds from its config before it writes anything: a bad value found here (a target module the
    model lacks, a task setting) stops the run with no run folder written."""

    tokenizer: PreTrainedTokenizerBase
    task: Task
    steps: int
    model_cfg: dict[str, Any]
    adapted: Adapted
    restarts: Restarts | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def prepare(cfg: DictConfig, accelerator: Accelerator) -> Prepared:
    t = cfg.train
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():  # process 0 tokenises and caches the data; the others then read it
        task: Task = build_task(cfg.task, tokenizer)
    steps = total_steps(t, len(task))
    check_eval_steps(t.eval_steps, steps)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not model_cfg.get("pretrained"):
        model_cfg["config"]["vocab_size"] = len(tokenizer)
    model = build_model(model_cfg, seed=cfg.seed)
    adapted = build_adapter(model, cfg.adapter, seed=cfg.seed)
    restarts = restarts_of(cfg.adapter)
    optimizer = adapted.optimizer(lr=t.lr, weight_decay=t.weight_decay, saved_lr=t.get("modules_to_save_lr"))
    factor = lr_factor(cfg, steps, restarts.every if restarts else None, restarts.warmup if restarts else 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return Prepared(tokenizer, task, steps, model_cfg, adapted, restarts, optimizer, scheduler)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    # torch's blocking host-to-device copy synchronises the stream: the host would wait for step n's kernels before
    # it queues step n + 1's. From pinned memory the copy is queued like a kernel (the pinned block is kept until
    # the copy has run)
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def _train(cfg: DictConfig, accelerator: Accelerator, out: Path, log: MetricsLog, built: Prepared) -> dict[str, Any]:
    t = cfg.train
    tokenizer, task, steps, model_cfg = built.tokenizer, built.task, built.steps, built.model_cfg
    adapted, restarts, scheduler = built.adapted, built.restarts, built.scheduler
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    model, optimizer = accelerator.prepare(adapted.model, built.optimizer)
    accelerator.register_for_checkpointing(scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index

    def autocast():  # train.mixed_precision=bf16: the forward in bf16 over the model's (fp32) weights
        if t.get("mixed_precision") == "bf16":
            return torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    micro, accumulation = t.micro_batch, t.global_batch // (t.micro_batch * world)

    start, tokens_seen, history = 0, 0, []
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, model, checkpoint)
        start, tokens_seen = state["step"], state["tokens"]
        kept = log.truncate_after(start)
        history = [r for r in kept if any(k.startswith("eval/") for k in r)]
        log.write({"step": start, "event": "resumed", "checkpoint": checkpoint.name})
    elif accelerator.is_main_process:
        (out / "metrics.jsonl").unlink(missing_ok=True)

    eval_steps = set(t.eval_steps or [steps])  # none named: the trained model
    evaluation: dict[str, Any] = {}
    batches = task.batches(start, t.global_batch, cfg.seed)
    loss_value = math.nan
    bar = tqdm(total=steps, initial=start, disable=not accelerator.is_main_process or not t.progress, desc=out.name)
    clock, clock_tokens = time.time(), tokens_seen
    loop_started, eval_s = clock, 0.0

    def evaluate_at(done: int) -> None:
        nonlocal evaluation, eval_s
        evaluating = time.time()
        metrics = [task.evaluate(accelerator.unwrap_model(model), t.eval_batch)]
        if world > 1:  # every process evaluated; lm-eval reports on LOCAL_RANK 0 only: process 0's result counts
            broadcast_object_list(metrics, from_process=0)
        metrics = metrics[0]
        details = metrics.pop("details", None)
        record = {"step": done, **{f"eval/{k}": v for k, v in metrics.items()}}
        record |= {"train/loss": loss_value} if done else {}  # step 0 has no training loss yet
        history.append(record)
        log.write(record)
        evaluation = {"step": done, "scores": metrics, **({"details": details} if details else {})}
        eval_s += time.time() - evaluating

    if start == 0 and 0 in eval_steps:  # the model before its first step: what training then changes
        evaluate_at(0)
    first_started, first_step = time.time(), (0.0, tokens_seen)  # this process's first step: (seconds, tokens after)
    for step in range(start, steps):
        examples = next(batches)
        full = task.collate(examples)
        n_tokens = int((full["labels"][:, 1:] != -100).sum())  # label tokens of the whole global batch
        mine = examples[rank * micro * accumulation : (rank + 1) * micro * accumulation]
        loss_sum = torch.zeros((), device=accelerator.device)
        model.train()
        for i in range(accumulation):
            batch = task.collate(mine[i * micro : (i + 1) * micro])
            batch = {k: _to_device(v, accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model), autocast():
                part = token_loss_sum(model, batch)
                # accelerate / DeepSpeed divide by the accumulation count and DDP averages over ranks: undo both,
                # so the update is (sum of token losses of the global batch) / (its label tokens)
                accelerator.backward(part * world * accumulation / n_tokens)
            loss_sum += part.detach()
        if t.max_grad_norm and not deepspeed:  # DeepSpeed clips with its config's gradient_clipping
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if restarts and restarts.due(done, steps):
            restarts.restart(accelerator.unwrap_model(model), optimizer)
            log.write({"step": done, "event": "restart"})
        tokens_seen += int(full["attention_mask"].sum())
        if step == start:  # it holds what compiles once (MoRA's graphs on a GPU): timed apart, its kernels finished
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize(accelerator.device)
            first_step = (time.time() - first_started, tokens_seen)
        logged = done % t.log_every == 0 or done == steps
        if logged or done in eval_steps:  # reading the loss waits for the device: only for a step that reports it
            loss_value = float(accelerator.reduce(loss_sum, reduction="sum")) / n_tokens
        if logged:
            elapsed = time.time() - clock
            rate = (tokens_seen - clock_tokens) / max(elapsed, 1e-9)
            log.write(
                {
                    "step": done,
                    "tokens": tokens_seen,
                    "train/loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(rate, 1),
                }
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if done in eval_steps:
            evaluate_at(done)
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < steps:
            save_checkpoint(accelerator, model, out, done, {"tokens": tokens_seen})
    bar.close()
    train_s = time.time() - loop_started - eval_s  # this process's steps (and checkpoints), evaluations apart
    # the rate after the first step, evaluations apart: what a long run trains at, its one-time costs excluded
    steady_s = train_s - first_step[0]
    steady = round((tokens_seen - first_step[1]) / steady_s, 1) if steps - start > 1 and steady_s > 0 else None
    accelerator.wait_for_everyone()
    spectrum_means = None
    # DoRA's weight is not base + delta (a magnitude rescales it): its spectrum is not computed
    if t.spectrum and cfg.adapter.method not in ("fft", "dora") and accelerator.is_main_process:
        spectrum_means = write_spectrum(model_cfg, cfg.seed, accelerator.unwrap_model(model), out)
    trainable = adapted.trainable_parameters()  # before a ReLoRA / ReMoRA model is merged to be saved
    state_dict = accelerator.get_state_dict(model)  # every rank: ZeRO-3 gathers its partitioned parameters here
    saved, merged = None, {}  # process 0's
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        if restarts:  # the base weights hold every earlier segment: the adapter alone is not the trained model
            trained.merge_and_unload().save_pretrained(out / "adapter")
        else:
            trained.save_pretrained(out / "adapter", state_dict=state_dict)
        tokenizer.save_pretrained(out / "adapter")  # an FFT or ReLoRA run's folder is then a loadable model
        saved = sum(f.stat().st_size for f in (out / "adapter").iterdir() if f.suffix in (".safetensors", ".bin"))
        if t.get("merge_check") and adapted.method != "fft" and not restarts:
            merged = merge_check(trained, int(trained.get_base_model().config.vocab_size))
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "rank": None if cfg.adapter.method == "fft" else cfg.adapter.r,
        "compression": cfg.adapter.get("compression"),
        "lr": t.lr,
        "steps": steps,
        "epochs": t.get("epochs"),
        "examples": len(task),
        "data_hash": task.data_hash,
        "global_batch": t.global_batch,
        "world_size": world,
        "accumulation": accumulation,
        "resumed_from": start or None,
        "trainable_params": trainable,
        "final_train_loss": loss_value,
        "tokens": tokens_seen,
        "tokens_per_s": round((tokens_seen - clock_tokens) / max(time.time() - clock, 1e-9), 1),
        "train_s": round(train_s, 2),
        "first_step_s": round(first_step[0], 2),
        "steady_tokens_per_s": steady,
        "eval_s": round(eval_s, 2),
        "adapter_file_bytes": saved,
        **merged,
        "evals": history,
        "evaluation": evaluation,
        **({"spectrum": spectrum_means} if spectrum_means else {}),
    }


def write_spectrum(model_cfg: dict[str, Any], seed: int, model: torch.nn.Module, out: Path) -> dict[str, float]:
    """Fig. 5's analysis into spectrum.json: the singular values of every adapted weight's update since step 0
    (the base rebuilt as it was built at step 0: same config and seed, or the same pretrained files). Returns the
    mean count above the threshold per module type."""
    initial = initial_weights(build_model(model_cfg, seed=seed), list(adapted_layers(model)))
    result = spectrum(iter_delta_weights(model, initial))
    (out / "spectrum.json").write_text(json.dumps(result))
    return {kind: entry["mean_above"] for kind, entry in result.items()}
