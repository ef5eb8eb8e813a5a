"""Models from a `model/*` config: random init from `config`, a hub id or local path, or the meta device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MissingAssetError(RuntimeError):
    """A model or dataset is not available offline. The message names it and how to get it."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def architecture(cfg: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config of `cfg.config` (model_type + fields)."""
    fields = dict(cfg["config"])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def ensure_local(name_or_path: str, what: str = "model", setting: str = "model.pretrained") -> str:
    """Fail fast, with one clear line, when a hub id is not cached and the hub is unreachable (offline)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        return name_or_path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise MissingAssetError(
            f"{what} {name_or_path!r} is not in the local Hugging Face cache and this machine is offline: on a "
            f"networked machine run `make prefetch PROFILE=paper`, or set {setting}=/path/to/a/local/copy"
        )
    return name_or_path


def build_model(cfg: Mapping[str, Any], meta: bool = False, seed: int = 0) -> PreTrainedModel:
    """The causal LM of a model config. meta=True builds the architecture without weights (no download)."""
    dtype = torch_dtype(str(cfg.get("dtype", "float32")))
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(architecture(cfg), dtype=dtype)
    if cfg.get("pretrained"):
        path = ensure_local(str(cfg["pretrained"]))
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(architecture(cfg), dtype=dtype)
