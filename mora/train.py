"""Train one composition of model x adapter x task x launcher x profile.

python -m mora.train adapter=lora adapter.r=8 train.lr=2e-4
python -m mora.train -m adapter=lora,mora adapter.r=8,256       # a local sweep
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mora.cli import check_overrides
from mora.models import MissingAssetError
from mora.paths import CONFIG_DIR
from mora.training.run import run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, MissingAssetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    check_overrides("train", sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
