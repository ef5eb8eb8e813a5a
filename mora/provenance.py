"""Which code made a record: the checkout's commit and whether it had uncommitted changes."""

from __future__ import annotations

import os
import subprocess

from mora.paths import REPO_ROOT


def commit() -> tuple[str, bool | None]:
    """(commit, uncommitted changes?) of the checkout. MORA_COMMIT, where set, names the commit a copied tree came
    from (a remote node's copy may lack .git or carry a stale one), and whether it had changes is unknown (None), as
    it is without git. Changes under results/, which a table runner rewrites while its runs go on, do not count."""
    if os.environ.get("MORA_COMMIT"):
        return os.environ["MORA_COMMIT"], None

    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        except FileNotFoundError:  # no git on the node
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    head = git("rev-parse", "HEAD")
    if not head:
        return "unknown", None
    return head, bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"))
