"""The house's arrows: a room of `mora/` imports only from rooms on a floor below its own, and no module imports
itself round a circle. Every import counts, also one inside a function; a new module takes its room's floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mora.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "mora"
# the rooms, lowest first; a module's room is the longest of these its name starts with
FLOORS = {
    "mora.paths": 0,
    "mora.provenance": 1,
    "mora.models": 1,
    "mora.prompts": 1,
    "mora.adapters": 1,
    "mora.reporting": 1,
    "mora": 2,  # the package itself: `import mora` registers MoRA with PEFT (the adapters)
    "mora.evaluation": 2,
    "mora.config": 3,
    "mora.tasks": 4,
    "mora.training": 5,
    "mora.cli": 6,  # what the entry points share: the one-line errors, the argument parser
    "mora.train": 7,
    "mora.launch": 7,
    "mora.inspect": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `mora` that `name` imports anywhere in its source (`from a import b` counts a.b where that
    is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {m for m in found if m in known and m != name}


def room(name: str) -> str:
    rooms = [r for r in FLOORS if name == r or name.startswith(r + ".")]
    assert rooms, f"{name} is in no room: give it a floor in tests/test_imports.py FLOORS"
    return max(rooms, key=len)


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_graph_sees_the_imports_it_should():
    edges = graph()
    assert "mora.adapters.peft_tuner.peft_type" in edges["mora.adapters.peft_tuner.config"]  # relative, top level
    assert "mora.training.run" in edges["mora.launch"]  # inside a function
    assert "mora.adapters.peft_tuner.registry" in edges["mora.adapters.peft_tuner"]


def test_no_arrow_runs_up_or_sideways():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            here, there = room(name), room(target)
            if here != there and FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{name} (floor {FLOORS[here]}) imports {target} (floor {FLOORS[there]})")
    assert not wrong, "\n".join(sorted(wrong))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, each as the modules along it."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle():
    assert circles(graph()) == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_circle_finder_finds_a_circle_and_only_one(edges, expected):
    assert circles(edges) == expected
