"""MoRA as a stock-PEFT method: importing this package registers it with PEFT."""

from .config import MoraConfig
from .layer import MoraLayer, MoraLinear
from .model import MoraModel
from .registry import register

register(MoraConfig, MoraModel)

__all__ = ["MoraConfig", "MoraLayer", "MoraLinear", "MoraModel"]
