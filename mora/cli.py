"""Our commands' bad arguments as one line `error: <what>; ...` with exit code 2: argparse for their own arguments
(the table runner, the GPU check), without argparse's usage block, naming the make variable behind an option where
a make target sets it; and Hydra's overrides of the Hydra entry points (mora.train, mora.inspect)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mora.config import one_line
from mora.paths import CONFIG_DIR


def check_overrides(config_name: str, overrides: list[str]) -> None:
    """Hydra's own answer to an unknown group or key is a few lines and exit code 1; composing the overrides once
    first turns it into our one line and exit code 2 (a multirun's sweep syntax and Hydra's own flags are left to
    Hydra)."""
    if any(a.startswith("-") for a in overrides):  # -m, --cfg, ...: Hydra alone
        return
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, make_variables: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.make_variables = make_variables or {}  # option (e.g. "--seeds") -> make variable (e.g. "SEED")

    def error(self, message: str) -> NoReturn:
        made = [self.make_variables[o] for o in re.findall(r"--[a-z0-9-]+", message) if o in self.make_variables]
        hint = f" (make: {made[0]})" if made else ""
        self.exit(2, f"error: {message}{hint}; `{self.prog} --help` lists the options\n")
