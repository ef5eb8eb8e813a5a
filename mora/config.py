"""The types and ranges of a composed config, checked in one place before any work: every entry point (mora.train,
mora.launch, mora.inspect, the table runner) calls `check` on the config it composed.

Why pydantic rather than Hydra structured configs: the configs are plain YAML groups whose keys differ per group
(a task's, an adapter's), and a structured schema would have to mirror each of them at compose time, where
OmegaConf reports a bad value in several lines of its own wording. A pydantic model per section checks the
composed config afterwards and reports each error with its location, the value given and the reason, which is
what one `error: <what> <value>: <why>; <what to do>` line needs. Keys a model does not name pass through
(Hydra already refuses unknown keys on the command line); cross-field rules (batch vs processes, eval steps vs
steps) stay in mora.training.run.validate.

A task's section differs per recipe: each recipe module (mora/tasks/<recipe>.py) names its own `Settings`, built
from the pieces here (`TaskSettings`, `Source`, `TextEval`), and `check_task` checks `task` against it.

The vocabulary every floor above shares: tasks, training and the entry points import it; it imports only
mora.paths (and, to know a column's name, mora.evaluation.columns).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from mora.paths import REPO_ROOT


class ConfigError(ValueError):
    """One bad value of a composed config, as one line: `<what> <value>: <why>; <what to do>`."""


def setting(hint: str, **constraints: Any) -> Any:
    """A field with the text that completes `give <key> as ...`, and its constraints (default, gt, ge, ...)."""
    return Field(json_schema_extra={"hint": hint}, **constraints)


class Section(BaseModel):
    """A config section: the fields a model names are checked, other keys pass through."""

    model_config = ConfigDict(extra="allow", strict=False)


class Train(Section):
    global_batch: int = setting("a positive integer, e.g. train.global_batch=64", gt=0)
    micro_batch: int = setting("a positive integer that divides train.global_batch", gt=0)
    lr: float = setting("a positive number, e.g. train.lr=2e-4", gt=0)
    schedule: Literal["constant", "linear", "cosine"] = setting("constant, linear or cosine")
    warmup: int = setting("a number of steps >= 0", ge=0)
    steps: int | None = setting(default=None, hint="a positive number of steps (or train.epochs)", gt=0)
    epochs: float | None = setting(default=None, hint="a positive number of epochs, or null", gt=0)
    weight_decay: float = setting("a number >= 0", ge=0)
    modules_to_save_lr: float | None = setting(default=None, hint="a positive number, or null (train.lr)", gt=0)
    max_grad_norm: float | None = setting(default=None, hint="a number >= 0 (0 or null: no clipping)", ge=0)
    log_every: int = setting("a positive number of steps", gt=0)
    eval_steps: list[Annotated[int, Field(ge=0)]] = setting(
        "a list of steps >= 0 (0: the model before training), e.g. 'train.eval_steps=[50,100]'"
    )
    eval_batch: int = setting("a positive integer", gt=0)
    checkpoint_every: int = setting("a number of steps >= 0 (0: no checkpoints)", ge=0)
    mixed_precision: Literal["bf16"] | None = setting(default=None, hint="null or bf16")
    spectrum: StrictBool = setting("true or false")
    merge_check: StrictBool = setting("true or false", default=False)
    progress: StrictBool = setting("true or false")


class Run(Section):
    root: str = setting("a folder for run folders, e.g. run.root=runs", min_length=1)
    experiment: str = setting("a name, e.g. run.experiment=adhoc", min_length=1)
    dir: str | None = setting(default=None, hint="a folder for this run, or null")


class Launcher(Section):
    name: Literal["local", "ddp", "deepspeed_zero2", "deepspeed_zero3"] = setting(
        "one of local, ddp, deepspeed_zero2, deepspeed_zero3 (launcher=...)"
    )
    num_processes: int = setting("a positive number of processes per machine", gt=0)
    num_machines: int = setting("a positive number of machines", default=1, gt=0)
    machine_rank: int = setting("this machine's rank, from 0", default=0, ge=0)
    main_process_port: int = setting("a TCP port, 1..65535", default=29500, gt=0, lt=65536)


class Model(Section):
    name: str = setting("a model config name (model=...)", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32, bfloat16 or float16")


class Adapter(Section):
    method: str = setting("an adapter config (adapter=...)", min_length=1)
    r: int | None = setting(default=None, hint="a positive integer rank, e.g. adapter.r=8", gt=0)
    alpha: float | None = setting(default=None, hint="a positive number", gt=0)
    dropout: float | None = setting(default=None, hint="a probability in [0, 1)", ge=0, lt=1)
    target_modules: list[str] | None = setting(
        default=None, hint="a list of module names, e.g. '[q_proj,v_proj]'", min_length=1
    )


class Composed(Section):
    """A composed config: train.yaml's sections (mora.inspect's config has only model and adapter)."""

    seed: int | None = setting("an integer, e.g. seed=0", default=None)
    train: Train | None = None
    run: Run | None = None
    model: Model | None = None
    adapter: Adapter | None = None
    launcher: Launcher | None = None


class TaskSettings(Section):
    """What every task section has; a recipe's `Settings` adds its own fields."""

    name: str = setting("a task config name (task=...)", min_length=1)
    recipe: str | None = setting(default=None, hint="a recipe module of mora/tasks, or null (the task's name)")
    probes: dict[str, dict[str, Any]] | None = setting(
        default=None, hint="a mapping of names to task sections to evaluate, not train on (mora/tasks/probes.py)"
    )


class Source(Section):
    """A dataset to read with `datasets.load_dataset(path, name, split=split, data_files=data_files)`."""

    path: str | None = setting(default=None, hint="a hub dataset id or a builder (json, text), e.g. json")
    name: str | None = setting(default=None, hint="a dataset config name, or null")
    split: str = setting("a split name, e.g. train", min_length=1)
    data_files: str | list[str] | dict[str, str | list[str]] | None = setting(
        default=None, hint="local files, e.g. '[/data/train.jsonl]' or '{train: /data/train.jsonl}', or null"
    )


class TextEval(Section):
    """A text task's evaluation through lm-eval (mora.evaluation.columns)."""

    columns: list[str] = setting("a list of Table 1 columns, e.g. '[gsm8k,math]'", min_length=1)
    source: Literal["hub", "fixture"] = setting("hub or fixture")
    batch_size: int = setting("a positive integer", gt=0)
    limit: int | None = setting(default=None, hint="a positive number of documents, or null (all)", gt=0)
    max_length: int | None = setting(default=None, hint="a positive number of tokens, or null (the model's)", gt=0)
    gen_kwargs: dict[str, Any] | None = setting(default=None, hint="a mapping, e.g. '{max_gen_toks: 64}', or null")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: list[str]) -> list[str]:
        from mora.evaluation.columns import columns

        known = columns()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a column (the columns are {', '.join(known)})")
        return value


def check_task(task: DictConfig | Mapping[str, Any], settings: type[BaseModel], where: str = "task") -> None:
    """Raise ConfigError on the first bad value of a task section (at key `where`), checked against its recipe's
    `Settings`."""
    data = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
    try:
        settings.model_validate(data)
    except ValidationError as errors:
        raise ConfigError(_line(errors.errors()[0], settings, where)) from None


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
    """A folder that is one, or can be created: no file in its place or above it, and a place the system lets us
    write. Permissions alone do not say that (root passes every check; /proc and read-only mounts refuse anyway), so
    it is tried: a nameless temporary file in an existing folder, or the first missing folder on the way to it,
    made and removed at once. Nothing is left behind. Runs checked side by side (the table runner's jobs) probe
    the same missing folders: where one removes a folder the other had found, the other looks again."""
    for _ in range(PROBE_ATTEMPTS):
        if _probe_folder(key, path):
            return
    raise ConfigError(f"{key} {str(path)!r}: the folders above it kept vanishing while it was checked; try again")


PROBE_ATTEMPTS = 100  # looks at a folder whose parents other processes' probes keep making and removing


def _probe_folder(key: str, path: Path) -> bool:
    """check_folder's one look: True when done, False where a folder on the way vanished meanwhile."""
    try:  # one look at what `path` is: between two (exists, then is_dir) another process's probe may remove it
        is_file = not stat.S_ISDIR(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):  # missing, or under a file (said below)
        is_file = False
    if is_file:
        raise ConfigError(f"{key} {str(path)!r}: is a file, not a folder; give {key} a new or existing folder")
    first_missing = path
    while not first_missing.parent.exists() and first_missing.parent != first_missing:
        first_missing = first_missing.parent
    parent = first_missing.parent if not path.exists() else path
    if not parent.is_dir():
        if parent.exists():
            raise ConfigError(f"{key} {str(path)!r}: lies under the file {parent}; give {key} a folder elsewhere")
        return False  # removed since: another process's probe
    try:
        if path.exists():
            tempfile.TemporaryFile(dir=path).close()
        else:
            os.mkdir(first_missing)
            with contextlib.suppress(OSError):  # another process of the run may have written into it since
                os.rmdir(first_missing)
    except FileExistsError:  # made by another process of the same run meanwhile
        pass
    except OSError as error:
        if isinstance(error, FileNotFoundError) and not parent.is_dir():
            return False  # the folder it was made in (or tried) was removed meanwhile
        raise ConfigError(
            f"{key} {str(path)!r}: cannot be {'written' if path.exists() else 'created'} ({error.strerror}); give "
            f"{key} a writable place"
        ) from None
    return True


def _line(error: Mapping[str, Any], root: type[BaseModel] | None = None, prefix: str = "") -> str:
    path = [part for part in error["loc"] if isinstance(part, str)]  # field names; a list item's index dropped
    key = ".".join([prefix, *path] if prefix else path)
    why = error["msg"].removeprefix("Value error, ")
    why = why[0].lower() + why[1:]
    return f"{key} {error.get('input')!r}: {why}; give {key} as {_hint(path, root or Composed)}"


def _hint(path: list[str], root: type[BaseModel]) -> str:
    # the hint of the innermost field on the path: Composed -> Train -> lr, say (a section may be `Launcher | None`)
    model: type[BaseModel] | None = root
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
