"""The types and ranges of a composed config, checked in one place before any work: every entry point (mora.train,
mora.launch, mora.inspect, the table runner) calls `check` on the config it composed.

Why pydantic rather than Hydra structured configs: the configs are plain YAML groups whose keys differ per group
(a task's, an adapter's), and a structured schema would have to mirror each of them at compose time, where
OmegaConf reports a bad value in several lines of its own wording. A pydantic model per section checks the
composed config afterwards and reports each error with its location, the value given and the reason, which is
what one `error: <what> <value>: <why>; <what to do>` line needs. Keys a model does not name pass through
(Hydra already refuses unknown keys on the command line); cross-field rules (batch vs processes, eval steps vs
steps) stay in mora.training.run.validate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from mora.paths import REPO_ROOT


class ConfigError(ValueError):
    """One bad value of a composed config, as one line: `<what> <value>: <why>; <what to do>`."""


def _field(hint: str, **constraints: Any) -> Any:
    """A field with the text that completes `give <key> as ...`, and its constraints (default, gt, ge, ...)."""
    return Field(json_schema_extra={"hint": hint}, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class Train(_Section):
    global_batch: int = _field("a positive integer, e.g. train.global_batch=64", gt=0)
    micro_batch: int = _field("a positive integer that divides train.global_batch", gt=0)
    lr: float = _field("a positive number, e.g. train.lr=2e-4", gt=0)
    schedule: Literal["constant", "linear", "cosine"] = _field("constant, linear or cosine")
    warmup: int = _field("a number of steps >= 0", ge=0)
    steps: int | None = _field(default=None, hint="a positive number of steps (or train.epochs)", gt=0)
    epochs: float | None = _field(default=None, hint="a positive number of epochs, or null", gt=0)
    weight_decay: float = _field("a number >= 0", ge=0)
    max_grad_norm: float | None = _field(default=None, hint="a number >= 0 (0 or null: no clipping)", ge=0)
    log_every: int = _field("a positive number of steps", gt=0)
    eval_steps: list[Annotated[int, Field(gt=0)]] = _field("a list of positive steps, e.g. 'train.eval_steps=[50,100]'")
    eval_batch: int = _field("a positive integer", gt=0)
    checkpoint_every: int = _field("a number of steps >= 0 (0: no checkpoints)", ge=0)
    mixed_precision: Literal["bf16"] | None = _field(default=None, hint="null or bf16")
    spectrum: StrictBool = _field("true or false")
    progress: StrictBool = _field("true or false")


class Run(_Section):
    root: str = _field("a folder for run folders, e.g. run.root=runs", min_length=1)
    experiment: str = _field("a name, e.g. run.experiment=adhoc", min_length=1)
    dir: str | None = _field(default=None, hint="a folder for this run, or null")


class Launcher(_Section):
    name: Literal["local", "ddp", "deepspeed_zero2", "deepspeed_zero3"] = _field(
        "one of local, ddp, deepspeed_zero2, deepspeed_zero3 (launcher=...)"
    )
    num_processes: int = _field("a positive number of processes per machine", gt=0)
    num_machines: int = _field("a positive number of machines", default=1, gt=0)
    machine_rank: int = _field("this machine's rank, from 0", default=0, ge=0)
    main_process_port: int = _field("a TCP port, 1..65535", default=29500, gt=0, lt=65536)


class Model(_Section):
    name: str = _field("a model config name (model=...)", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = _field("float32, bfloat16 or float16")


class Adapter(_Section):
    method: str = _field("an adapter config (adapter=...)", min_length=1)
    r: int | None = _field(default=None, hint="a positive integer rank, e.g. adapter.r=8", gt=0)
    alpha: float | None = _field(default=None, hint="a positive number", gt=0)
    dropout: float | None = _field(default=None, hint="a probability in [0, 1)", ge=0, lt=1)
    target_modules: list[str] | None = _field(
        default=None, hint="a list of module names, e.g. '[q_proj,v_proj]'", min_length=1
    )


class Composed(_Section):
    """A composed config: train.yaml's sections (mora.inspect's config has only model and adapter)."""

    seed: int | None = _field("an integer, e.g. seed=0", default=None)
    train: Train | None = None
    run: Run | None = None
    model: Model | None = None
    adapter: Adapter | None = None
    launcher: Launcher | None = None


def check(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise ConfigError on the first value of the wrong type or out of range, naming it and what to give, and on
    a run folder that cannot be one."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    try:
        Composed.model_validate(data)
    except ValidationError as errors:
        raise ConfigError(_line(errors.errors()[0])) from None
    run = data.get("run") or {}
    if run.get("dir"):
        check_folder("run.dir", Path(run["dir"]))
    elif run.get("root"):
        check_folder("run.root", REPO_ROOT / run["root"])


def check_folder(key: str, path: Path) -> None:
    """A folder that is one, or can be created: no file in its place or above it, and a writable parent."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {str(path)!r}: is a file, not a folder; give {key} a new or existing folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {str(path)!r}: lies under the file {parent}; give {key} a folder elsewhere")
    if not path.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"{key} {str(path)!r}: cannot be created ({parent} is not writable); give a writable place")


def _line(error: Mapping[str, Any]) -> str:
    path = [part for part in error["loc"] if isinstance(part, str)]  # field names; a list item's index dropped
    key = ".".join(path)
    why = error["msg"][0].lower() + error["msg"][1:]
    return f"{key} {error.get('input')!r}: {why}; give {key} as {_hint(path)}"


def _hint(path: list[str]) -> str:
    # the hint of the innermost field on the path: Composed -> Train -> lr, say (a section may be `Launcher | None`)
    model: type[BaseModel] | None = Composed
    hint = "a value of the right type"
    for part in path:
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            break
        hint = (info.json_schema_extra or {}).get("hint", hint)
        candidates = (info.annotation, *getattr(info.annotation, "__args__", ()))
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return hint


def one_line(error: Exception) -> str:
    """One line of Hydra's or OmegaConf's message, which runs over several (the key, the full key, the type, the
    search path): its first, with the options where it lists them ("Available options in 'adapter': ...")."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    if not lines or not lines[0]:
        return type(error).__name__
    if "Available options" in str(error):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[start + 1 :] if line and not line.startswith(("Config search", "provider="))]
        return f"{lines[0]}; choose one of {', '.join(options)}"
    return lines[0]
