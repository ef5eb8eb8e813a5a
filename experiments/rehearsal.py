"""A dress rehearsal of a GPU profile on this machine: each run of a table keeps its launcher, optimizer, schedule
shape, precision, restarts, evaluation columns and reporter, and only its sizes shrink (`shrunk`):

- the model: its architecture, 64 wide and 2 layers deep (its MLP / width and key-value / query head ratios kept);
  a pretrained hub model (LLaMA-2-7B) becomes a randomly initialised stand-in of that shape saved in a local folder
  with the fixtures' tokenizer (`stand_in`), a model built from config is built at that shape;
- the adapter's rank and alpha: scaled with the width (r / width and alpha / r as the paper's), at least 1 (GraLoRA:
  a multiple of its k), and so a method's own rank (`adapter.args.r`: MiSS, LoKr, RandLoRA); C3A's block sizes
  scaled with the width to divisors of the shrunk layers;
- the data: each task's local fixtures in its source's schema (the tiny profile's `task` sources and sizes),
  `REHEARSAL_PAIRS` UUID pairs, `EVAL_LIMIT` documents per benchmark;
- the schedule: `REHEARSAL_STEPS` steps (a run set in epochs keeps its epochs over the fixture), warmup, eval
  steps, merge intervals and their re-warm scaled into the run (each at least 1 step where the paper's is not 0),
  the last step evaluated too (a run set in epochs evaluates only it), a checkpoint every `CHECKPOINT_EVERY` steps,
  every step logged;
- the batch: micro-batches of `MICRO_BATCH` (of 1 in a run set in epochs, so that its few fixture rows still make
  several steps and ReLoRA's merges fall inside it), accumulating 2 where the paper's profile accumulates on 8
  GPUs.

experiments/reproduce.py --rehearse applies it to every run; experiments/rehearse.py (make rehearse) runs every
table that way and checks each run's saved adapter.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REHEARSAL_STEPS = 10
WIDTH, LAYERS, HEADS = 64, 2, 4
MICRO_BATCH = 2
EPOCH_MICRO_BATCH = 1  # a Table 1 fixture of 8 to 16 rows still makes several steps an epoch
PAPER_GPUS = 8  # the paper profiles' batches are laid out for one node of 8 GPUs
NOMINAL_STEPS = 10_000  # the scale of a run set in epochs (Table 1: 5k to 9k steps; Table 3's 10k)
CHECKPOINT_EVERY = 1
REHEARSAL_PAIRS = 32
EVAL_LIMIT = 4  # documents per benchmark (at least the processes, which lm-eval shares them among)
EVAL_BATCH = 8
# the task settings that are sizes or sources: taken from the same task's tiny profile (local fixtures)
DATA_KEYS = (
    "source",
    "eval_source",
    "block_size",
    "max_length",
    "tokenizer",
    "vocab_size",
    "train_tokens",
    "eval.source",
    "eval.batch_size",
    "eval.gen_kwargs",
    "eval.tokens",
)


def hydra_value(value: Any) -> str:
    """A Python value as Hydra's override grammar writes it (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):  # quoted where the grammar would read it otherwise
        plain = re.fullmatch(r"[A-Za-z0-9_./@+-]+", value) and value not in ("null", "true", "false")
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "[" + ",".join(hydra_value(v) for v in value) + "]"


def replace(overrides: list[str], values: dict[str, Any]) -> list[str]:
    """The overrides with `values` in place of any override of the same keys (Hydra refuses a key twice), each with
    the `+` / `++` of the one it replaces (a key the config lacks stays added)."""
    kept, added = [], {}
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.lstrip("+~") in values:
            added[key.lstrip("+~")] = key[: len(key) - len(key.lstrip("+"))]
        else:
            kept.append(override)
    return [*kept, *(f"{added.get(k, '')}{k}={hydra_value(v)}" for k, v in values.items())]


def _scaled(value: int, steps: int) -> int:
    """A step count of a `steps`-long run moved into a REHEARSAL_STEPS-long one: at least 1 where it was not 0."""
    return 0 if not value else max(1, min(REHEARSAL_STEPS, round(value * REHEARSAL_STEPS / steps)))


def model_shape(c: DictConfig) -> dict[str, int]:
    """A model config's sizes at rehearsal size: WIDTH wide, LAYERS deep, HEADS heads, its ratios kept."""
    heads = int(c.num_attention_heads)
    return {
        "hidden_size": WIDTH,
        "intermediate_size": round(WIDTH * c.intermediate_size / c.hidden_size),
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": max(1, HEADS * int(c.get("num_key_value_heads") or heads) // heads),
    }


def model_values(model: DictConfig, root: Path, stand_ins: Path) -> dict[str, Any]:
    """The model at rehearsal size; a pretrained hub model's stand-in folder is made here when missing (a base model
    that the runner trains under `root` stays as it is)."""
    values: dict[str, Any] = {f"model.config.{k}": v for k, v in model_shape(model.config).items()}
    pretrained = model.get("pretrained")
    if pretrained and not Path(str(pretrained)).is_relative_to(root):
        folder = stand_ins / str(model.name)
        shape = OmegaConf.from_dotlist([f"{k.removeprefix('model.')}={v}" for k, v in values.items()])
        stand_in(OmegaConf.merge(model, shape), folder)
        values["model.pretrained"] = str(folder)
    return values


def stand_in(model: DictConfig, folder: Path) -> None:
    """A randomly initialised model of the (shrunk) architecture with the fixtures' tokenizer, saved as a hub model
    would be, in its own dtype: the rehearsal's pretrained model. Made once (seed 0)."""
    if (folder / "config.json").is_file():
        return
    from mora.models import build_model
    from mora.tasks.tokenizer import fixture_bpe

    tokenizer = fixture_bpe()
    spec = OmegaConf.to_container(model, resolve=True)
    spec["config"]["vocab_size"] = len(tokenizer)
    spec["config"]["bos_token_id"], spec["config"]["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    partial = folder.with_name(folder.name + ".partial")
    build_model({**spec, "pretrained": None}, seed=0).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


def adapter_values(cfg: DictConfig) -> dict[str, Any]:
    """Rank and alpha scaled with the width: r / width and alpha / r stay the paper's; GraLoRA's r stays a multiple
    of its k blocks; a method's own rank (adapter.args.r) and C3A's blocks (`block_values`) scale with the width
    too."""
    a = cfg.adapter
    if a.method == "fft" or a.get("r") is None:
        return {}
    r = max(1, round(a.r * WIDTH / cfg.model.config.hidden_size))
    blocks = (a.get("args") or {}).get("gralora_k")
    if blocks:  # a rank-r/k LoRA on each of k x k blocks
        r = blocks * math.ceil(r / blocks)
    values: dict[str, Any] = {"adapter.r": r}
    if a.get("alpha") is not None:
        values["adapter.alpha"] = float(a.alpha) * r / a.r
    args = a.get("args") or {}
    own = "r" in args and not OmegaConf.is_interpolation(args, "r")  # a method's own rank (MiSS, LoKr, RandLoRA)
    if own:
        values["adapter.args.r"] = max(1, round(args.r * WIDTH / cfg.model.config.hidden_size))
    if "r" in args and args.get("alpha") is not None:  # and its alpha, alpha / r kept (LoKr, GraLoRA)
        values["adapter.args.alpha"] = float(args.alpha) * (values["adapter.args.r"] if own else r) / args.r
    return values | block_values(cfg)


def block_values(cfg: DictConfig) -> dict[str, Any]:
    """C3A's block sizes (adapter.args.block_size and its per-module pattern) at rehearsal size: each scaled with
    the width, then down to a divisor of every layer size of the shrunk model, as a block must divide its layer's
    d_in and d_out (at least 1)."""
    args = cfg.adapter.get("args") or {}
    if cfg.adapter.method != "peft" or "block_size" not in args:
        return {}
    c, shape = cfg.model.config, model_shape(cfg.model.config)
    head = WIDTH // shape["num_attention_heads"]
    sizes = math.gcd(WIDTH, shape["intermediate_size"], head * shape["num_key_value_heads"])

    def fit(block: int) -> int:
        scaled = max(1, round(block * WIDTH / c.hidden_size))
        return max(d for d in range(1, sizes + 1) if sizes % d == 0 and d <= scaled)

    values = {"adapter.args.block_size": fit(args.block_size)}
    for module, block in (args.get("block_size_pattern") or {}).items():
        values[f"adapter.args.block_size_pattern.{module}"] = fit(block)
    return values


def schedule_values(cfg: DictConfig, world: int) -> dict[str, Any]:
    t = cfg.train
    steps = NOMINAL_STEPS if t.get("epochs") is not None else int(t.steps)
    accumulation = 2 if t.global_batch > t.micro_batch * PAPER_GPUS else 1
    micro = EPOCH_MICRO_BATCH if t.get("epochs") is not None else MICRO_BATCH
    values: dict[str, Any] = {
        "train.micro_batch": micro,
        "train.global_batch": micro * world * accumulation,
        "train.warmup": _scaled(int(t.warmup), steps),
        "train.log_every": 1,
        "train.eval_batch": EVAL_BATCH,
        "train.checkpoint_every": CHECKPOINT_EVERY if t.checkpoint_every else 0,
    }
    if t.get("epochs") is None:
        values["train.steps"] = REHEARSAL_STEPS
        # and the last step, so that the saved adapter can be checked against an evaluation of itself
        values["train.eval_steps"] = sorted({*(_scaled(int(s), steps) for s in t.eval_steps), REHEARSAL_STEPS})
    restart = cfg.adapter.get("restart")
    if restart is not None:
        values["adapter.restart.every"] = _scaled(int(restart.every), steps)
        values["adapter.restart.warmup"] = _scaled(int(restart.warmup), steps)
    return values


def task_values(cfg: DictConfig, tiny: DictConfig) -> dict[str, Any]:
    """The task's local fixtures and sizes (its tiny profile's), UUID pairs, documents per benchmark."""
    values: dict[str, Any] = {}
    for key in DATA_KEYS:
        if OmegaConf.select(cfg.task, key) is not None or OmegaConf.select(tiny.task, key) is not None:
            value = OmegaConf.select(tiny.task, key)
            values[f"task.{key}"] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if "n_pairs" in cfg.task:
        values["task.n_pairs"] = REHEARSAL_PAIRS
    if "columns" in (cfg.task.get("eval") or {}):
        values["task.eval.limit"] = EVAL_LIMIT
    return values


def shrunk(cfg: DictConfig, tiny: DictConfig, world: int, root: Path, stand_ins: Path) -> dict[str, Any]:
    """The overrides that shrink one composed run `cfg` to rehearsal size (`tiny`: the same task composed on the
    tiny profile, for its fixtures; `world`: the run's processes; `root`: the runner's folder of the table)."""
    return {
        **model_values(cfg.model, root, stand_ins),
        **adapter_values(cfg),
        **task_values(cfg, tiny),
        **schedule_values(cfg, world),
    }
