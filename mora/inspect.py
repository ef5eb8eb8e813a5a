"""What an adapter costs on a model, built on the meta device: MoRA's r_hat and trainable parameters per layer
beside LoRA's at the same r; any other method's trainable parameters and saved size beside LoRA's at its budget.

python -m mora.inspect model=llama2_7b adapter=mora adapter.r=8 adapter.compression=rope
python -m mora.inspect model=llama2_7b adapter=mora adapter.r=256 adapter.compression=sharing rows=summary
python -m mora.inspect model=llama2_7b adapter=miss adapter.r=256 adapter.args.r=470
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model_state_dict
from rich.console import Console
from rich.table import Table
from transformers.initialization import no_init_weights

from mora.adapters.build import MORA_FAMILY, build_adapter, method_name
from mora.adapters.peft_tuner import MoraLayer
from mora.cli import check_overrides
from mora.config import check
from mora.models import build_model
from mora.paths import CONFIG_DIR


@dataclass
class LayerRow:
    name: str
    d_in: int
    d_out: int
    r_hat: int
    mora: int
    lora: int


@dataclass(frozen=True)
class Footprint:
    """What an adapter config costs on a model."""

    trainable: int  # trainable parameters of the adapted model
    saved_bytes: int  # the tensors `save_pretrained` writes: the adapter's state dict (FFT: the whole model)
    device: str  # where it was counted: meta, or cpu for a method that cannot be built on the meta device


def _count(model_cfg: Mapping[str, Any], adapter_cfg: Mapping[str, Any], layers: int) -> Footprint:
    model_cfg = copy.deepcopy(dict(model_cfg))
    model_cfg["config"] = {**model_cfg["config"], "num_hidden_layers": layers}
    try:
        adapted, device = build_adapter(build_model(model_cfg, meta=True), adapter_cfg), "meta"
    except NotImplementedError:  # data-dependent on the weights (SHiRA's mask: torch.nonzero): real, uninitialised
        with no_init_weights():
            adapted, device = build_adapter(build_model({**model_cfg, "pretrained": None}), adapter_cfg), "cpu"
    model = adapted.model
    tensors = model.state_dict() if adapted.method == "fft" else get_peft_model_state_dict(model)
    saved = sum(t.numel() * t.element_size() for t in tensors.values())
    return Footprint(adapted.trainable_parameters(), saved, device)


def footprint(model_cfg: Mapping[str, Any], adapter_cfg: Mapping[str, Any]) -> Footprint:
    """The trainable parameters and saved bytes of `adapter_cfg` on the model of `model_cfg`, counted on its
    architecture with one and with two decoder layers and extended to all of them: exact where every decoder layer
    is alike (every LLaMA here), and fast at 7B (a meta build of 32 layers through PEFT takes seconds; a method that
    reads its weights at build time, SHiRA, is built with real, uninitialised ones: its random mask takes about 10 s
    a layer of LLaMA-2-7B)."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if isinstance(adapter_cfg, DictConfig):
        adapter_cfg = OmegaConf.to_container(adapter_cfg, resolve=True)
    layers = int(model_cfg["config"]["num_hidden_layers"])
    one, two = _count(model_cfg, adapter_cfg, 1), _count(model_cfg, adapter_cfg, 2)
    return Footprint(
        one.trainable + (layers - 1) * (two.trainable - one.trainable),
        one.saved_bytes + (layers - 1) * (two.saved_bytes - one.saved_bytes),
        one.device,
    )


def lora_at(adapter_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """LoRA at an adapter's budget (its r) on its target modules: the count the budget is matched to."""
    r = adapter_cfg["r"]
    return {"method": "lora", "r": r, "alpha": 2 * r, "target_modules": list(adapter_cfg["target_modules"])}


def render_budget(cfg: DictConfig) -> Table:
    """One method's footprint beside LoRA's at its budget (adapter.r)."""
    a = OmegaConf.to_container(cfg.adapter, resolve=True)
    if a["method"] == "fft" or a.get("r") is None:
        raise ValueError(f"mora.inspect compares an adapter with LoRA at its budget; adapter={a['method']} has no r")
    own, lora = footprint(cfg.model, a), footprint(cfg.model, lora_at(a))
    table = Table(title=f"{cfg.model.name}: {method_name(a)} at LoRA's budget r={a['r']}")
    for column in ("method", "settings", "trainable", "/ LoRA's", "saved MB"):
        table.add_column(column, justify="left" if column in ("method", "settings") else "right")
    settings = ", ".join(f"{k}={v}" for k, v in (a.get("args") or {}).items()) or f"r={a['r']}"
    table.add_row(
        method_name(a),
        settings,
        f"{own.trainable:,}",
        f"{own.trainable / lora.trainable:.3f}",
        f"{own.saved_bytes / 2**20:.1f}",
    )
    table.add_row("lora", f"r={a['r']}", f"{lora.trainable:,}", "1.000", f"{lora.saved_bytes / 2**20:.1f}")
    table.caption = f"counted on the {own.device} device: one and two decoder layers, extended to all"
    return table


def layer_rows(cfg: DictConfig) -> tuple[list[LayerRow], int]:
    """One row per MoRA layer, and the trainable parameters of the whole PEFT model (meta device)."""
    if cfg.adapter.method not in MORA_FAMILY:
        raise ValueError(f"mora.inspect compares MoRA with LoRA: use adapter=mora or remora, not {cfg.adapter.method}")
    adapted = build_adapter(build_model(cfg.model, meta=True), cfg.adapter)
    rows = []
    for name, module in adapted.model.named_modules():
        if isinstance(module, MoraLayer):
            size = module.mora_r_hat["default"]
            lora = (module.in_features + module.out_features) * module.mora_r["default"]
            rows.append(
                LayerRow(
                    name.removeprefix("base_model.model."),
                    module.in_features,
                    module.out_features,
                    size,
                    size * size,
                    lora,
                )
            )
    return rows, adapted.trainable_parameters()


def summarise(rows: list[LayerRow]) -> list[LayerRow]:
    """Merge rows by module name (q_proj, ...), summing parameters; r_hat is per shape, so it stays unique."""
    groups: dict[tuple[str, int, int, int], list[LayerRow]] = defaultdict(list)
    for row in rows:
        groups[(row.name.rsplit(".", 1)[-1], row.d_in, row.d_out, row.r_hat)].append(row)
    return [
        LayerRow(
            f"{key[0]} x{len(group)}", key[1], key[2], key[3], sum(g.mora for g in group), sum(g.lora for g in group)
        )
        for key, group in groups.items()
    ]


def render(rows: list[LayerRow], trainable: int, cfg: DictConfig) -> Table:
    a = cfg.adapter
    table = Table(title=f"{cfg.model.name}: MoRA r={a.r} ({a.compression}, {a.rounding} rounding) vs LoRA r={a.r}")
    for column in ("module", "d_in", "d_out", "r_hat", "MoRA params", "LoRA params"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in rows:
        table.add_row(row.name, str(row.d_in), str(row.d_out), str(row.r_hat), f"{row.mora:,}", f"{row.lora:,}")
    mora_total, lora_total = sum(r.mora for r in rows), sum(r.lora for r in rows)
    table.add_section()
    table.add_row("total", "", "", "", f"{mora_total:,}", f"{lora_total:,}")
    table.caption = (
        f"trainable parameters of the built PEFT model: {trainable:,}; MoRA / LoRA = {mora_total / lora_total:.4f}"
    )
    return table


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="inspect")
def main(cfg: DictConfig) -> None:
    try:
        check(cfg)
        if cfg.adapter.method not in MORA_FAMILY:
            Console(width=120).print(render_budget(cfg))
            return
        rows, trainable = layer_rows(cfg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if cfg.rows == "summary":
        rows = summarise(rows)
    Console(width=120).print(render(rows, trainable, cfg))


def cli() -> None:
    check_overrides("inspect", sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
