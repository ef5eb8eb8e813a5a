"""argparse for our commands' own arguments (the table runner, the GPU check): a bad argument is one line
`error: <what>; ...` with exit code 2, without argparse's usage block, naming the make variable behind an option
where a make target sets it."""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, make_variables: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.make_variables = make_variables or {}  # option (e.g. "--seeds") -> make variable (e.g. "SEED")

    def error(self, message: str) -> NoReturn:
        made = [self.make_variables[o] for o in re.findall(r"--[a-z0-9-]+", message) if o in self.make_variables]
        hint = f" (make: {made[0]})" if made else ""
        self.exit(2, f"error: {message}{hint}; `{self.prog} --help` lists the options\n")
