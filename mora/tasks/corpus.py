"""Corpora of real English text that every machine with our install has: the tiny profiles' stand-ins for C4.

`python_docs`, documents in C4's schema (text, timestamp, url):
- each topic of the Python language reference shipped with the interpreter (`pydoc_data.topics`, the text `help()`
  shows: about 0.47 M characters on Python 3.11);
- the docstrings of each top-level module of the standard library, joined per module (about 0.89 M characters).

`package_docs`, for runs long enough to memorise `python_docs` (Table 3's regime sweep): `python_docs`, then the
docstrings of every other module of the standard library and of the packages pinned in requirements.txt (PACKAGES),
one document per module file, tests left out and a docstring already seen (the arguments that transformers copies
into hundreds of models) kept once: about 20 M characters, 6.1 M tokens of the tiny profile's BPE to train on. Its
documents are ordered by a hash of their url, so that both splits (and the first blocks of the validation split,
which an evaluation with `task.eval.tokens` reads) mix every source. Reading the packages' files takes about a
minute: the documents are kept once in the data cache under the Python version and the packages' versions.

Every tenth document (by position in that fixed order) is the validation split; the rest is train. The text
depends on the Python version (recorded in each run's env.json; the data hash in summary.json changes with it) and,
for `package_docs`, on the pinned versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from mora.paths import cache_root

SPLITS = ("train", "validation")
VALIDATION_EVERY = 10
CORPORA = ("python_docs", "package_docs")
# import name -> distribution: the packages requirements.txt pins by name (not what they pull in, whose versions
# the resolver picks), with docstrings worth reading
PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "datasets": "datasets",
    "huggingface_hub": "huggingface-hub",
    "accelerate": "accelerate",
    "peft": "peft",
    "deepspeed": "deepspeed",
    "matplotlib": "matplotlib",
    "trl": "trl",
    "wandb": "wandb",
    "lm_eval": "lm-eval",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "pydantic": "pydantic",
    "rich": "rich",
    "tqdm": "tqdm",
    "_pytest": "pytest",
}
SKIPPED_FOLDERS = {"test", "tests", "testing", "site-packages", "dist-packages", "__pycache__"}


def docstrings(path: Path) -> list[str]:
    """The docstrings of a Python file (module, classes, functions) in source order; none if it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    nodes = (n for n in ast.walk(tree) if isinstance(n, kinds))
    return [s for s in (ast.get_docstring(n) for n in nodes) if s]


@lru_cache(maxsize=1)
def python_docs() -> tuple[dict[str, str], ...]:
    """Every document of the corpus, in a fixed order (topics by name, then modules by file name)."""
    from pydoc_data.topics import topics

    docs = [{"text": topics[name], "timestamp": "", "url": f"pydoc:{name}"} for name in sorted(topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = "\n\n".join(docstrings(path))
        if text:
            docs.append({"text": text, "timestamp": "", "url": f"stdlib:{path.stem}"})
    return tuple(docs)


def module_docs(root: Path, name: str, seen: set[str]) -> list[dict[str, str]]:
    """One document per Python file under root (sorted; test folders left out): its docstrings not in `seen`,
    which it extends. The url names the module: `{name}:{path under root}`."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1]):
            continue
        fresh = [s for s in docstrings(path) if s not in seen]
        seen.update(fresh)
        if fresh:
            docs.append({"text": "\n\n".join(fresh), "timestamp": "", "url": f"{name}:{path.relative_to(root)}"})
    return docs


def by_url_hash(docs: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Documents in an order fixed by their urls alone, mixing sources (sha256 of the url)."""
    return sorted(docs, key=lambda d: hashlib.sha256(d["url"].encode()).hexdigest())


def package_versions() -> dict[str, str]:
    """What `package_docs` is made of: the Python version and each package's installed version."""
    versions = {"python": sys.version.split()[0]}
    for name, dist in PACKAGES.items():
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _package_root(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def build_package_docs() -> list[dict[str, str]]:
    """`package_docs`' documents (about a minute: every file of the packages is parsed)."""
    docs = list(python_docs())
    seen = {s for d in docs for s in d["text"].split("\n\n")}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for folder in sorted(p for p in stdlib.iterdir() if p.is_dir() and p.name not in SKIPPED_FOLDERS):
        docs += module_docs(folder, f"stdlib:{folder.name}", seen)
    for name in PACKAGES:
        root = _package_root(name)
        if root is not None:
            docs += module_docs(root, name, seen)
    return by_url_hash(docs)


@lru_cache(maxsize=1)
def package_docs() -> tuple[dict[str, str], ...]:
    """`package_docs`, built once per Python and package versions into the data cache (written to a temporary file
    and renamed: jobs side by side never read a half-written one)."""
    versions = package_versions()
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / f"package_docs-{key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"versions": versions, "documents": build_package_docs()}))
        tmp.replace(path)
    return tuple(json.loads(path.read_text())["documents"])


def split_of(docs: Iterable[dict[str, str]], split: str, corpus: str) -> list[dict[str, str]]:
    """A corpus' split: every tenth document (by position) is `validation`, the rest `train`."""
    if split not in SPLITS:
        raise ValueError(f"the {corpus} corpus has splits {', '.join(SPLITS)}, not {split!r}; fix task.source.split")
    held_out = split == "validation"
    return [d for i, d in enumerate(docs) if (i % VALIDATION_EVERY == 0) == held_out]


def python_docs_split(split: str) -> list[dict[str, str]]:
    return split_of(python_docs(), split, "python_docs")


def corpus_split(corpus: str, split: str) -> list[dict[str, str]]:
    """The split of one of CORPORA."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; the built-in corpora are {', '.join(CORPORA)}")
    return split_of(python_docs() if corpus == "python_docs" else package_docs(), split, corpus)
