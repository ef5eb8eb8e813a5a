"""Registers MoRA as a PEFT method, its model card and its adapter-folder checks. The one place that touches PEFT
internals.

PEFT's `register_peft_method` accepts only names that are members of its `PeftType` enum, and the enum has no MORA.
`mora_peft_type()` adds the member once (guarded by the installed PEFT version), then `register()` registers
MoraConfig / MoraModel under it, so that stock `get_peft_model`, `PeftModel.from_pretrained` and friends work.
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
from packaging.version import Version
from peft.utils import PeftType

NAME = "mora"
# the oldest PEFT the adapter runs on (tests/adapters pass with peft 0.20.0, transformers 4.56.2, torch 2.13.0;
# 0.19 lacks peft.utils.resolve_quantization_backend, 0.17 tuners_utils._get_in_out_features)
PEFT_MIN = Version("0.20.0")
PEFT_TESTED = Version("0.21.2")


def check_peft_version(version: str = peft.__version__) -> None:
    """Refuse a PEFT without `register_peft_method`; warn on one newer than the tested release."""
    installed = Version(version)
    if installed < PEFT_MIN:
        raise ImportError(f"mora needs peft>={PEFT_MIN}; installed peft=={version}: pip install -U 'peft>={PEFT_MIN}'")
    if Version(installed.base_version) > PEFT_TESTED:
        warnings.warn(
            f"mora was tested with peft=={PEFT_TESTED}; installed peft=={version}. If get_peft_model fails, "
            f"pin peft=={PEFT_TESTED}.",
            UserWarning,
            stacklevel=2,
        )


def mora_peft_type() -> PeftType:
    """PeftType.MORA, adding the member to PEFT's enum if this PEFT lacks it."""
    key = NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    member.__init__(key)
    setattr(PeftType, key, member)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member


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

    from .card import finish_card, write_card

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

    from .folder import MoraAdapterError, check_folder

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
