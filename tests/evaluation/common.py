"""Shared by the evaluation tests: a task folder's utils.py as a module, and a fixture's rows."""

import importlib.util
import json
from types import ModuleType

from mora.evaluation.harness import FIXTURES_DIR, TASKS_DIR


def task_utils(folder: str) -> ModuleType:
    """mora/evaluation/tasks/<folder>/utils.py, loaded as lm-eval loads it (by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"mora_{folder}_task_utils", TASKS_DIR / folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_rows(name: str, split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (FIXTURES_DIR / name / f"{split}.jsonl").read_text().splitlines()]
