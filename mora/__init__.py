"""mora-lab: MoRA (arXiv 2405.12130) as a stock-PEFT method, the paper's baselines, and its experiments.

`import mora` registers MoRA with PEFT, so `peft.get_peft_model(model, mora.MoraConfig(...))` works, and
`mora.load(path)` loads a saved adapter on its base model.
"""

from mora.adapters.mora import COMPRESSIONS, OFFICIAL_TYPES, delta, delta_weight, r_hat
from mora.adapters.peft_tuner import MoraAdapterError, MoraConfig, MoraLayer, MoraModel, load

__version__ = "0.1.0"

__all__ = [
    "COMPRESSIONS",
    "MoraAdapterError",
    "OFFICIAL_TYPES",
    "MoraConfig",
    "MoraLayer",
    "MoraModel",
    "delta",
    "delta_weight",
    "load",
    "r_hat",
]
