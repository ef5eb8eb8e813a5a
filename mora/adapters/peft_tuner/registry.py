"""Registers MoRA as a PEFT method, its model card and its adapter-folder checks. With peft_type.py, the one place
that touches PEFT internals.

`register()` registers MoraConfig / MoraModel under PeftType.MORA (peft_type.py), so that stock `get_peft_model`,
`PeftModel.from_pretrained` and friends work.
"""

from __future__ import annotations

from typing import Any

from .card import finish_card, write_card
from .folder import MoraAdapterError, check_folder
from .peft_type import NAME, check_peft_version, mora_peft_type


def register(config_cls: type, model_cls: type) -> None:
    """Register MoRA with PEFT once; a second call with the same classes is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    check_peft_version()
    peft_type = mora_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None:
        raise ImportError(
            f"PEFT already has a method named {NAME!r} ({registered.__module__}.{registered.__name__}); "
            "mora-lab's MoRA cannot be registered beside it"
        )
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


def patch_model_card() -> None:
    """Make PeftModel.save_pretrained write MoRA's model card (card.py) for MoRA adapters; PEFT's own card logic
    still runs on top of it. Once per process."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_mora_card", False):
        return

    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        write_card(self, output_dir)
        original(self, output_dir)
        finish_card(output_dir)

    create_or_update_model_card._mora_card = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def patch_loading() -> None:
    """Make PeftModel.from_pretrained and load_adapter check a local MoRA adapter folder before PEFT reads it, and
    name the folder when its weights do not fit the model (folder.py). Once per process."""
    from peft import PeftModel

    if getattr(PeftModel.load_adapter, "_mora_checked", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    def named(error: MoraAdapterError, model_id: Any) -> MoraAdapterError:
        text = str(error)
        return error if text.startswith(str(model_id)) else MoraAdapterError(f"{model_id}: {text}")

    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, **kwargs):
        check_folder(model_id, kwargs.get("subfolder"), has_config=config is not None)
        try:
            return original_from_pretrained(cls, model, model_id, adapter_name, is_trainable, config, **kwargs)
        except MoraAdapterError as error:
            raise named(error, model_id) from None

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        check_folder(model_id, kwargs.get("subfolder"))
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except MoraAdapterError as error:
            raise named(error, model_id) from None

    load_adapter._mora_checked = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
