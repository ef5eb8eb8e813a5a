"""A corpus of real English text that every machine with Python has: the tiny profile's stand-in for C4.

Documents, in C4's schema (text, timestamp, url):
- each topic of the Python language reference shipped with the interpreter (`pydoc_data.topics`, the text `help()`
  shows: about 0.47 M characters on Python 3.11);
- the docstrings of each top-level module of the standard library, joined per module (about 0.89 M characters).

Every tenth document (by position in that fixed order) is the validation split; the rest is train. The text
depends on the Python version (recorded in each run's env.json; the data hash in summary.json changes with it).
"""

from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "validation")
VALIDATION_EVERY = 10


@lru_cache(maxsize=1)
def python_docs() -> tuple[dict[str, str], ...]:
    """Every document of the corpus, in a fixed order (topics by name, then modules by file name)."""
    from pydoc_data.topics import topics

    docs = [{"text": topics[name], "timestamp": "", "url": f"pydoc:{name}"} for name in sorted(topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        strings = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        text = "\n\n".join(s for s in strings if s)
        if text:
            docs.append({"text": text, "timestamp": "", "url": f"stdlib:{path.stem}"})
    return tuple(docs)


def python_docs_split(split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"the python_docs corpus has splits {', '.join(SPLITS)}, not {split!r}; fix task.source.split")
    held_out = split == "validation"
    return [d for i, d in enumerate(python_docs()) if (i % VALIDATION_EVERY == 0) == held_out]
