"""Per-layer r_hat and trainable parameters of MoRA beside LoRA at the same r, built on the meta device.

python -m mora.inspect model=llama2_7b adapter=mora adapter.r=8 adapter.compression=rope
python -m mora.inspect model=llama2_7b adapter=mora adapter.r=256 adapter.compression=sharing rows=summary
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mora.adapters.build import MORA_FAMILY, build_adapter
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
