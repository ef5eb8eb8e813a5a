"""One entry point for every method of the paper: an adapter config -> a trainable model and its optimizer (ReLoRA's
and ReMoRA's restart policy: mora.training.restarts.restarts_of).

Methods: fft, lora, loraplus, dora, asylora, relora (LoRA layers), mora, remora (MoRA layers), and peft: any
weight-adapting method PEFT ships, named by its config class (`config_class: HiraConfig`, `args: {...}`) and built
through stock `peft.get_peft_model`, with no code per method.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftType, PromptLearningConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora import LoraLayer
from torch import nn

from mora.adapters.peft_tuner import MoraConfig
from mora.adapters.restart import next_grouping, regroup_of

PAPER_METHODS: tuple[str, ...] = ("fft", "lora", "loraplus", "dora", "asylora", "relora", "mora", "remora")
METHODS: tuple[str, ...] = (*PAPER_METHODS, "peft")  # peft: any other method PEFT ships, by its config class
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

    def optimizer(
        self,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        saved_lr: float | None = None,
    ):
        """AdamW over the trainable parameters; LoRA+ puts lr * ratio on B (PEFT's LoRA+ optimizer). `saved_lr`:
        the modules trained whole beside the adapter (PEFT's modules_to_save: embeddings, norms, head) in a group
        of their own at that LR (the schedule scales both groups alike)."""
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if saved_lr is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            saved = [p for n, p in named if ".modules_to_save." in n]
            if not saved or self.method == "loraplus":
                raise ValueError(
                    f"a learning rate for the modules to save ({saved_lr}) needs adapter.modules_to_save, and "
                    "a method with one group (not loraplus)"
                )
            rest = [p for n, p in named if ".modules_to_save." not in n]
            groups = [{"params": rest, "lr": lr}, {"params": saved, "lr": saved_lr}]
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas)
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


def _rank_pattern(cfg: Mapping[str, Any]) -> dict[str, int]:
    """A rank per module name over adapter.r (PEFT's rank_pattern; DoRA at the tiny profile's r = 2 needs it to
    match LoRA's count): the names must be targets, the ranks positive integers."""
    pattern = dict(cfg.get("rank_pattern") or {})
    targets = list(_get(cfg, "target_modules", []))
    for name, rank in pattern.items():
        if name not in targets:
            raise ValueError(f"adapter.rank_pattern names {name!r}, which is not in adapter.target_modules {targets}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"adapter.rank_pattern.{name} must be a positive integer rank, got {rank!r}")
    return pattern


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"adapter.target_modules {missing} are not modules of {type(model).__name__}; "
            f"it has e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}"
        )


def weight_methods() -> dict[str, type[PeftConfig]]:
    """The config classes of every method PEFT (and this package: MoraConfig) registers that adapts weights, by
    class name; prompt-based methods (prompt / prefix tuning, adaption prompts) are left out."""
    return {
        cls.__name__: cls
        for peft_type, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if not issubclass(cls, PromptLearningConfig) and peft_type != PeftType.ADAPTION_PROMPT
    }


def method_name(cfg: Mapping[str, Any]) -> str:
    """A method's short name: `method`, or for method peft its config class without `Config` (hira, lokr)."""
    if cfg.get("method") == "peft":
        return str(cfg.get("config_class")).removesuffix("Config").lower()
    return str(cfg.get("method"))


def peft_method_config(cfg: Mapping[str, Any], targets: list[str], modules_to_save: list[str] | None) -> PeftConfig:
    """The PEFT config of method peft: `config_class` with `args` as they are, on `targets`. A class that is not
    one, an argument the class does not have, or one it refuses is one ValueError naming it."""
    name = cfg.get("config_class")
    classes = weight_methods()
    if name not in classes:
        raise ValueError(
            f"adapter.config_class {name!r} is not a PEFT config class of a method that adapts weights; give one of "
            f"{', '.join(sorted(classes))}"
        )
    cls = classes[name]
    if cfg.get("dropout") is not None:
        raise ValueError(
            f"adapter.dropout {cfg['dropout']!r} is not read by method peft; give the method's own dropout in "
            "adapter.args (its name in the config class, e.g. hira_dropout), or adapter.dropout=null"
        )
    args = _plain(cfg.get("args") or {})  # PEFT writes them to adapter_config.json: no OmegaConf containers
    own_keys = sorted({"target_modules", "modules_to_save"} & set(args))
    if own_keys:
        raise ValueError(f"adapter.args.{own_keys[0]} is the adapter's own key: give adapter.{own_keys[0]}")
    common = {f.name for f in dataclasses.fields(PeftConfig)}  # peft_type, task_type, inference_mode, ...
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - common - {"target_modules", "modules_to_save"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(
            f"adapter.args.{unknown[0]} is not an argument of {name}; give one of {', '.join(sorted(fields))}"
        )
    try:
        return cls(target_modules=targets, modules_to_save=modules_to_save, **args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter.args {args}: {name} refuses them: {_first_line(error)}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
    rank_pattern (LoRA family: a rank per module name, over r), loraplus_ratio (loraplus), regroup (remora: checked
    against the compression here), modules_to_save; method peft: config_class and args (r is then the budget, the
    LoRA rank whose trainable parameters the args match). The `restart` block of ReLoRA / ReMoRA is the training
    loop's (mora.training.restarts.restarts_of).
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
    modules_to_save = list(cfg["modules_to_save"]) if cfg.get("modules_to_save") else None
    if method == "peft":
        config = peft_method_config(cfg, targets, modules_to_save)
        try:
            return Adapted(_get_peft_model(model, config), method)
        except ValueError as error:  # the method's own check of its args against a layer's shape
            raise ValueError(
                f"adapter.args {dict(cfg.get('args') or {})} do not fit {type(model).__name__} "
                f"({cfg['config_class']}: {_first_line(error)}); the knob per model: experiments/budgets.py"
            ) from None
    dropout = float(_get(cfg, "dropout", 0.0))

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
        rank_pattern=_rank_pattern(cfg),
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
