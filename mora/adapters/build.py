"""One entry point for every method of the paper: an adapter config -> a trainable model and its optimizer (ReLoRA's
and ReMoRA's restart policy: mora.training.restarts.restarts_of).

Methods: fft, lora, loraplus, dora, asylora, relora (LoRA layers), mora, remora (MoRA layers).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora import LoraLayer
from torch import nn

from mora.adapters.peft_tuner import MoraConfig
from mora.adapters.restart import next_grouping, regroup_of

METHODS: tuple[str, ...] = ("fft", "lora", "loraplus", "dora", "asylora", "relora", "mora", "remora")
LORA_FAMILY = ("lora", "loraplus", "dora", "asylora", "relora")
MORA_FAMILY = ("mora", "remora")


def _get_peft_model(model: nn.Module, config: Any) -> nn.Module:
    # PEFT 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every
    # build that is theirs, not a use of ours: silenced here alone
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


@dataclass
class Adapted:
    """A model ready to train with one method of the paper."""

    model: nn.Module
    method: str
    loraplus_ratio: float | None = None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer(self, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
        """AdamW over the trainable parameters; LoRA+ puts lr * ratio on B (PEFT's LoRA+ optimizer)."""
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if self.method == "loraplus":
            optimizer = create_loraplus_optimizer(
                self.model,
                optimizer_cls=torch.optim.AdamW,
                lr=lr,
                loraplus_lr_ratio=self.loraplus_ratio,
                weight_decay=weight_decay,
                betas=betas,
            )
            # PEFT keeps a group for embedding adapters even when there are none; DeepSpeed drops empty groups, and
            # the LR scheduler, built over the optimizer's groups before, then fails at its first step
            optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
            return optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _positive_r(cfg: Mapping[str, Any]) -> int:
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"adapter.r must be a positive integer, got {r!r}")
    return r


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"adapter.target_modules {missing} are not modules of {type(model).__name__}; "
            f"it has e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}"
        )


def asylora_init_(model: nn.Module, seed: int | None = None) -> None:
    """AsyLoRA's initialisation (PAPER.md §2.2): A = the first r columns of V^T from the SVD of a uniform random
    d_in x d_in matrix (rows orthonormal), B = 0, A stays trainable. The authors' code draws
    rand(d_in, max(d_in, 4096)), which only fits A when d_in >= 4096, where the two agree. The SVDs run on the GPU
    where there is one, as theirs (224 of them on LLaMA-2-7B, up to 11008 x 11008): the engine builds the adapter
    before the model moves there, and on one CPU thread per process they would take hours. On the meta device there
    is nothing to initialise."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    gpu = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, lora_A in module.lora_A.items():
            if lora_A.weight.is_meta:
                continue
            r, d_in = lora_A.weight.shape
            random = torch.rand(d_in, d_in, generator=generator, dtype=torch.float32).to(gpu or lora_A.weight.device)
            _, _, vh = torch.linalg.svd(random)  # (d_in, d_in), orthogonal
            with torch.no_grad():
                lora_A.weight.copy_(vh[:, :r].T.to(lora_A.weight.dtype))
                module.lora_B[name].weight.zero_()


def build_adapter(model: nn.Module, cfg: Mapping[str, Any], seed: int | None = None) -> Adapted:
    """Wrap `model` for the method `cfg["method"]`.

    Keys: method, r, alpha (LoRA family), dropout, target_modules, compression and rounding (MoRA family),
    loraplus_ratio (loraplus), regroup (remora: checked against the compression here), modules_to_save. The
    `restart` block of ReLoRA / ReMoRA is the training loop's (mora.training.restarts.restarts_of).
    """
    method = cfg.get("method")
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return Adapted(model, method)

    r = _positive_r(cfg)
    targets = list(_get(cfg, "target_modules", []))
    if not targets:
        raise ValueError("adapter.target_modules is empty: name the modules to adapt, e.g. [q_proj, v_proj]")
    _check_targets(model, targets)
    dropout = float(_get(cfg, "dropout", 0.0))
    modules_to_save = list(cfg["modules_to_save"]) if cfg.get("modules_to_save") else None

    if method in MORA_FAMILY:
        compression = str(_get(cfg, "compression", "rope"))
        regroup = regroup_of(cfg)
        if regroup is not None:
            next_grouping(compression, regroup)  # fail now if this operator cannot regroup
        config = MoraConfig(
            r=r,
            compression=compression,
            rounding=str(_get(cfg, "rounding", "official")),
            dropout=dropout,
            target_modules=targets,
            modules_to_save=modules_to_save,
        )
        peft_model = _get_peft_model(model, config)
        return Adapted(peft_model, method)

    alpha = cfg.get("alpha")
    if alpha is None or alpha <= 0:
        raise ValueError(f"adapter.alpha must be positive for {method}, got {alpha!r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=method == "dora",
        modules_to_save=modules_to_save,
    )
    peft_model = _get_peft_model(model, config)
    if method == "asylora":
        asylora_init_(peft_model, seed)
    ratio = None
    if method == "loraplus":
        ratio = float(_get(cfg, "loraplus_ratio", 4.0))
        if ratio <= 0:
            raise ValueError(f"adapter.loraplus_ratio must be positive, got {ratio}")
    return Adapted(peft_model, method, ratio)
