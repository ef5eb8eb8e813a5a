"""A saved MoRA adapter folder, checked before PEFT reads it: every kind of damage is one exception type,
`MoraAdapterError` (a ValueError), naming the folder, the file and what is wrong. PEFT alone answers some of them
confusingly: a local folder without adapter_config.json gets a hub error ("Repo id must be in the form ..."), a
damaged file a JSON decoder or safetensors traceback.

Only local MoRA folders are checked; hub ids and other PEFT methods' folders go to PEFT untouched."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
REQUIRED = ("r", "compression")  # without them the defaults would load another adapter than the one saved


class MoraAdapterError(ValueError):
    """A MoRA adapter folder that cannot be loaded as it is: missing or damaged files, a bad config, or weights
    whose shapes do not fit the model."""


def is_local(path: str | os.PathLike) -> bool:
    """A path meant as a local folder: one that exists, or that cannot be a hub id ("name" or "owner/name")."""
    text = str(path)
    return Path(text).exists() or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1


def check_folder(path: str | os.PathLike, subfolder: str | None = None, has_config: bool = False) -> None:
    """Raise MoraAdapterError if a local MoRA adapter folder is damaged (has_config: the caller passes the config,
    so the folder's own is not needed)."""
    if not is_local(path):
        return
    folder = Path(path).expanduser() / (subfolder or "")
    if not folder.is_dir():
        raise MoraAdapterError(f"{folder}: no such adapter folder; give the folder model.save_pretrained wrote")
    if not has_config:
        data = _config(folder)
        if data is None:  # another PEFT method: PEFT's own checks
            return
    weights = next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise MoraAdapterError(
            f"{folder}: no {' or '.join(WEIGHTS)}: the adapter's weights are missing; save the adapter again"
        )
    if weights.suffix == ".safetensors":
        _check_safetensors(weights)


def _config(folder: Path) -> dict[str, Any] | None:
    """The folder's MoRA config, checked; None for another PEFT method."""
    from .config import MoraConfig

    path = folder / CONFIG
    if not path.is_file():
        raise MoraAdapterError(f"{folder}: no {CONFIG}; this is not a saved PEFT adapter folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoraAdapterError(
            f"{path}: not valid JSON ({error}); the file is damaged, save the adapter again"
        ) from None
    if not isinstance(data, dict):
        raise MoraAdapterError(f"{path}: holds a {type(data).__name__}, not a JSON object of config fields")
    if data.get("peft_type") != "MORA":
        if "peft_type" not in data:
            raise MoraAdapterError(f"{path}: has no peft_type; a PEFT adapter config names its method")
        return None
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise MoraAdapterError(f"{path}: incomplete MoRA config, without {', '.join(missing)}; save the adapter again")
    fields = {f.name for f in dataclasses.fields(MoraConfig)}
    try:
        MoraConfig(**{k: v for k, v in data.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as error:
        raise MoraAdapterError(f"{path}: {error}") from None
    return data


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                f.get_slice(key).get_shape()
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise MoraAdapterError(
            f"{path}: not a readable safetensors file ({type(error).__name__}: {error}); it is truncated or "
            "damaged, save the adapter again"
        ) from None
    if not any("mora_M" in key for key in keys):
        raise MoraAdapterError(f"{path}: holds no MoRA weights (no mora_M tensor) though {CONFIG} says MORA")
