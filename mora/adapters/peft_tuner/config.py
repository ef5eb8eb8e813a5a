"""MoraConfig: the PEFT config of MoRA. `r` is LoRA's rank; the square size r_hat is inferred per layer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from mora.adapters.mora import COMPRESSIONS, ROUNDINGS, check_compression

from .peft_type import mora_peft_type

R_HAT_RULES = {
    "official": "r_hat = int(sqrt((d_in + d_out) * r) + 0.5)",
    "paper": "r_hat = floor(sqrt((d_in + d_out) * r))",
}
# Options of LoraConfig that MoRA has no use for: set, they are ignored with a warning.
LORA_ONLY_OPTIONS = ("lora_alpha", "use_rslora", "use_dora", "init_lora_weights", "lora_dropout")


def describe_r_hat_rule(rounding: str, compression: str) -> str:
    rule = R_HAT_RULES[rounding]
    return rule + (", then rounded down to even" if compression == "rope" else "")


@dataclass
class MoraConfig(PeftConfig):
    """Configuration of a MoRA adapter (arXiv 2405.12130).

    Args:
        r: LoRA's rank, the parameter budget. Each targeted layer gets a square M of side r_hat with about
            (d_in + d_out) * r entries, by the rule `rounding` names.
        compression: the operator, one of `mora.adapters.mora.COMPRESSIONS`. The paper uses `rope` at small r
            (r=8) and `sharing` at large r (r=256).
        rounding: `official` (nearest integer, as the authors' code) or `paper` (floor).
        dropout: dropout on the layer input before compression.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save,
            trainable_token_indices: as in LoraConfig (PEFT applies the last two to any method).
        init_weights: True gives M = 0, an exact no-op; False gives a random M (for tests and analysis).
        lora_alpha, use_rslora, use_dora, init_lora_weights, lora_dropout: LoRA options MoRA does not use; setting
            one warns and it is ignored (MoRA has no scaling). Unset, they are left out of adapter_config.json.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank giving the budget; r_hat is inferred per layer"})
    compression: str = field(default="rope", metadata={"help": f"operator: one of {', '.join(COMPRESSIONS)}"})
    rounding: str = field(default="official", metadata={"help": "r_hat rounding: official (nearest) or paper"})
    r_hat_rule: str = field(default="", metadata={"help": "the r_hat rule in words; filled in, not an input"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the adapter"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer ids"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer pattern"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra trainable modules"})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "PEFT's trainable tokens: train only these rows of the input embedding (a list), or of named "
            "embedding layers ({name: [indices]}); TRL sets it for the tokens a chat template adds"
        },
    )
    init_weights: bool = field(default=True, metadata={"help": "True: M = 0 (no-op); False: random M"})
    implementation: str = field(default="mora-lab", metadata={"help": "which code wrote this adapter"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "ignored (LoRA-only)"})
    use_rslora: Optional[bool] = field(default=None, metadata={"help": "ignored (LoRA-only)"})
    use_dora: Optional[bool] = field(default=None, metadata={"help": "ignored (LoRA-only)"})
    init_lora_weights: Optional[Union[bool, str]] = field(default=None, metadata={"help": "ignored (LoRA-only)"})
    lora_dropout: Optional[float] = field(default=None, metadata={"help": "ignored (LoRA-only); use dropout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = mora_peft_type()
        check_compression(self.compression)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"MoraConfig: r must be a positive integer, got {self.r!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"MoraConfig: unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoraConfig: dropout must be in [0, 1), got {self.dropout!r}")
        self.r_hat_rule = describe_r_hat_rule(self.rounding, self.compression)
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MoraConfig: layers_pattern is only used together with layers_to_transform")
        for option in LORA_ONLY_OPTIONS:
            value = getattr(self, option)
            if value is not None:
                hint = " (MoRA's is `dropout`)" if option == "lora_dropout" else ""
                warnings.warn(
                    f"MoraConfig: {option}={value!r} is a LoRA option that MoRA does not use{hint}; it is ignored. "
                    "MoRA's update f_decomp(M f_comp(x)) has no scaling.",
                    UserWarning,
                    stacklevel=3,
                )

    def to_dict(self) -> dict:
        """PEFT's dict (what adapter_config.json holds) without the LoRA-only options left unset."""
        data = super().to_dict()
        for option in LORA_ONLY_OPTIONS:
            if data.get(option) is None:
                data.pop(option, None)
        return data
