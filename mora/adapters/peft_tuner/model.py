"""MoraModel: PEFT's tuner for MoRA; injects MoraLinear into the targeted modules."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .config import MoraConfig
from .layer import MoraLayer, MoraLinear, check_supported_base


class MoraModel(BaseTuner):
    """MoRA (arXiv 2405.12130) as a PEFT tuner. Build it with `peft.get_peft_model(model, MoraConfig(...))`."""

    prefix: str = "mora_"
    tuner_layer_cls = MoraLayer
    # Default targets per architecture: the same modules LoRA adapts.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        peft_config: MoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, MoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        check_supported_base(target, current_key)
        new_module = MoraLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Unloading trainable tokens / modules_to_save: the wrapper's `weight` is a computed tensor, not a Parameter,
        # so BaseTuner's weight hand-over fails; the unwrapped module already holds its weights (as LoraModel does).
        if isinstance(child, AuxiliaryTrainingWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)
