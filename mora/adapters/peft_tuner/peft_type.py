"""MoRA's member of PEFT's `PeftType` enum, and the PEFT versions it runs on: the bottom of the tuner package, which
the config (and through it everything else) imports.

PEFT's `register_peft_method` accepts only names that are members of its `PeftType` enum, and the enum has no MORA:
`mora_peft_type()` adds the member once, after `check_peft_version()` has refused a PEFT that is too old.
"""

from __future__ import annotations

import warnings

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
