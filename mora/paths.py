"""Where the project's files live: the repository, its Hydra configs and the data cache."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def cache_root() -> Path:
    """The data cache: tokenised datasets and built corpora (MORA_DATA_CACHE, default ~/.cache/mora-lab/data)."""
    return Path(os.environ.get("MORA_DATA_CACHE", Path.home() / ".cache" / "mora-lab" / "data"))
