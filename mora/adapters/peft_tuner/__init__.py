"""MoRA as a stock-PEFT method: importing this package registers it with PEFT."""

from .peft_type import check_peft_version

check_peft_version()  # before the modules that import what older PEFTs lack

from .config import MoraConfig  # noqa: E402
from .folder import MoraAdapterError  # noqa: E402
from .layer import MoraLayer, MoraLinear  # noqa: E402
from .loading import load  # noqa: E402
from .model import MoraModel  # noqa: E402
from .registry import patch_loading, patch_model_card, register  # noqa: E402

register(MoraConfig, MoraModel)
patch_model_card()
patch_loading()

__all__ = ["MoraAdapterError", "MoraConfig", "MoraLayer", "MoraLinear", "MoraModel", "load"]
