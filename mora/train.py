"""Train one composition of model x adapter x task x launcher x profile.

python -m mora.train adapter=lora adapter.r=8 train.lr=2e-4
python -m mora.train -m adapter=lora,mora adapter.r=8,256       # a local sweep
"""

from __future__ import annotations

import sys

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mora.models import MissingAssetError
from mora.paths import CONFIG_DIR
from mora.training.run import run
from mora.training.schema import one_line


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, MissingAssetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """Hydra's own answer to an unknown group or key is a few lines and exit code 1; composing the overrides once
    first turns it into our one line and exit code 2 (a multirun's sweep syntax is left to Hydra)."""
    overrides = sys.argv[1:]
    if not any(a.startswith("-") for a in overrides):  # -m, --cfg, ...: Hydra alone
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                compose(config_name="train", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
