"""The model card (README.md) a saved MoRA adapter carries: what it is, how it was built, and the one line a user
needs to load it (MoRA is not part of PEFT: `import mora` registers it; without it PEFT fails with KeyError 'MORA').

PEFT's `save_pretrained` writes a generic card, or updates an existing README.md; we write ours first, PEFT then adds
its tags and version to it (registry.patch_model_card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import MoraConfig

PAPER = "[MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning](https://arxiv.org/abs/2405.12130)"
OPERATORS = {
    "truncation": "truncation (Eq. 4)",
    "sharing": "sharing (Eq. 6)",
    "decouple": "decouple (Eq. 8)",
    "rope": "rotation (Eq. 9)",
    "sharing_chunked": "sharing, chunked groups (ReMoRA's second kind, App. B)",
    "sharing_chunked_in": "sharing, chunked input / cyclic output groups (the authors' type 3)",
    "sharing_chunked_out": "sharing, cyclic input / chunked output groups (the authors' type 4)",
}


def card_text(configs: dict[str, MoraConfig]) -> str:
    """The card of a model whose MoRA adapters are `configs` (name -> config)."""
    first = next(iter(configs.values()))
    base = first.base_model_name_or_path
    header = ["---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags:", "- mora", "---", ""]
    lines = [
        *header,
        "# MoRA adapter",
        "",
        f"A {PAPER} (Jiang et al., 2024) adapter, saved by [mora-lab](https://github.com/mora-lab/mora-lab).",
        "MoRA trains one square matrix M per layer instead of LoRA's two low-rank matrices, at the same number of",
        "parameters: ΔW x = f_decomp(M f_comp(x)).",
        "",
        f"- Base model: `{base}`" if base else "- Base model: not recorded (the model was built from a config)",
    ]
    for name, config in configs.items():
        targets = ", ".join(sorted(config.target_modules)) if isinstance(config.target_modules, set) else None
        lines += [
            f"- Adapter `{name}`: operator {OPERATORS.get(config.compression, config.compression)}, r = {config.r} "
            f"(LoRA's rank: the budget), r̂ per layer by `{config.r_hat_rule}`"
            + (f", on {targets}" if targets else (f", on `{config.target_modules}`" if config.target_modules else "")),
        ]
    task = first.task_type or "a model without a task type"
    lines += [
        f"- Task type: {task}",
        "",
        "## Load it",
        "",
        "MoRA is not built into PEFT. Install mora-lab and import it before loading; without `import mora`, PEFT",
        "fails with `KeyError: 'MORA'`.",
        "",
        "```bash",
        "pip install mora-lab",
        "```",
        "",
        "```python",
        "import mora",
        "",
        'model = mora.load("path/to/this/adapter")  # the base model above with this adapter (AutoPeftModel)',
        "```",
        "",
        "or, with PEFT's own classes after `import mora`: `peft.AutoPeftModelForCausalLM.from_pretrained(path)`,",
        "`peft.PeftModel.from_pretrained(base_model, path)`. `model.merge_and_unload()` gives a plain model that",
        "needs neither mora nor peft.",
        "",
        "",
    ]
    return "\n".join(lines)


def write_card(model: Any, output_dir: str) -> None:
    """Write the MoRA card into output_dir/README.md when the model has MoRA adapters and no card is there yet."""
    configs = {name: c for name, c in getattr(model, "peft_config", {}).items() if isinstance(c, MoraConfig)}
    path = Path(output_dir) / "README.md"
    if configs and not path.exists():
        path.write_text(card_text(configs))


def finish_card(output_dir: str) -> None:
    """After PEFT's update: tag the card `mora` (PEFT replaces the tags) and drop `base_model: ''` and its tag,
    which PEFT records for a model built from a config and which say nothing."""
    from huggingface_hub import ModelCard

    path = Path(output_dir) / "README.md"
    if not path.exists() or "# MoRA adapter" not in path.read_text():
        return
    card = ModelCard.load(path)
    tags = {*(card.data.tags or []), "mora"}
    if not card.data.base_model:
        card.data.base_model = None
        tags.discard("base_model:adapter:")
    card.data.tags = sorted(tags)
    card.save(path)
