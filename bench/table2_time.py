"""Wall time of `make reproduce-table2` on the tiny profile (3 seeds), run into a temporary folder so that the
committed runs and results are untouched.

    python bench/table2_time.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write  # noqa: E402
from mora.paths import REPO_ROOT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(REPO_ROOT / "experiments" / "reproduce.py"),
            "table2",
            "--profile",
            "tiny",
            "--seeds",
            *map(str, args.seeds),
            "--runs",
            f"{tmp}/runs",
            "--out",
            f"{tmp}/out",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    table = (
        "# Wall time of the Table 2 reproduction (tiny profile)\n\n"
        f"`experiments/reproduce.py table2 --profile tiny --seeds {' '.join(map(str, args.seeds))}` (what `make "
        f"reproduce-table2` runs after install): **{wall / 60:.1f} min** ({wall:.0f} s).\n"
    )
    write("table2_time", {"seeds": args.seeds, "wall_s": wall}, table)


if __name__ == "__main__":
    main()
