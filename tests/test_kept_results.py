"""Nothing committed is lost: a table command, however narrowed, builds its table from the records kept in results/
and its new runs together. Each test works on a copy of the committed results of one table."""

import csv
import shutil
from pathlib import Path

import pytest

from experiments.reproduce import main as reproduce
from mora.paths import REPO_ROOT

pytestmark = pytest.mark.slow

# table: its committed results, and a narrowed command whose every run is kept there
TABLES = {
    "table1": ("results/table1", ["--tasks", "metamath", "--cells", "lora-r8", "mora-r256", "--seeds", "0"]),
    "table2": ("results/table2", ["--cells", "lora-r8", "--seeds", "1"]),
    "table3": ("results/table3", ["--cells", "mora", "--seeds", "2"]),
    "table4": ("results/table4", ["--cells", "rope-r8", "--seeds", "0"]),
    "table2_regime_w64": ("results/table2/regime", ["--cells", "mora-r8", "--seeds", "0", "1"]),
    "table3_regime": ("results/table3/regime", ["--cells", "lora-w48-s300", "--seeds", "0"]),
}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under folder by its path there (plots by name only: matplotlib's bytes are not ours)."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): b"" if p.suffix == ".png" else p.read_bytes() for p in files}


def _copy(tmp_path: Path, results: str) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "results"
    shutil.copytree(REPO_ROOT / results, out)
    return out, _files(out)


def _reproduce(table: str, tmp_path: Path, out: Path, *args: str) -> int:
    return reproduce([table, *args, "--runs", str(tmp_path / "runs" / table / "tiny"), "--out", str(out)])


@pytest.mark.parametrize("table", TABLES)
def test_a_narrowed_command_of_kept_runs_runs_nothing_and_leaves_the_table_as_it_was(tmp_path, capsys, table):
    results, narrowed = TABLES[table]
    out, before = _copy(tmp_path, results)
    assert _reproduce(table, tmp_path, out, *narrowed) == 0
    assert f"{table} (tiny): 0 runs to do" in capsys.readouterr().out
    assert _files(out) == before  # every record, table and CSV byte for byte; every plot still there
    assert not (tmp_path / "runs" / table / "tiny" / "base").exists()  # no cell to train: no base either


def _changed_rows(before: str, after: str) -> set[str]:
    return {line for line in before.splitlines() if line.startswith("|")} - set(after.splitlines())


@pytest.mark.parametrize(
    ("table", "narrowed", "rows", "tables"),
    [
        (
            "table1",
            ["--tasks", "metamath", "--cells", "fft"],
            ("| FFT | - |",),
            ["table1.md", "table6.md", "table7.md"],
        ),
        ("table2", ["--cells", "fft"], ("| FFT | - |",), ["table2.md"]),
        # a short run (a new seed of its own config): only its rows (perplexity, spectrum) may move
        (
            "table3",
            ["--cells", "lora", "--set", "train.steps=6", "train.eval_steps=[6]"],
            ("| LoRA |", "| tiny | LoRA |"),
            ["table3.md"],
        ),
    ],
)
def test_a_new_seed_adds_to_the_table_and_keeps_every_record(tmp_path, table, narrowed, rows, tables):
    results = TABLES[table][0]
    out, before = _copy(tmp_path, results)
    assert _reproduce(table, tmp_path, out, *narrowed, "--seeds", "7") == 0
    after = _files(out)
    records = {k for k in before if k.startswith("runs/")}
    assert all(after[k] == before[k] for k in records)  # every committed record in place, unchanged
    new = {k.split("/")[-2] for k in set(after) - set(before)}
    assert new and all(name.endswith("-s7") for name in new), new
    for name in tables:
        moved = _changed_rows(before[name].decode(), after[name].decode())
        assert all(line.startswith(rows) for line in moved), moved  # the other cells' rows as committed
    table_csv = next(k for k in after if k.endswith(".csv") and "/" not in k)
    written = list(csv.DictReader(after[table_csv].decode().splitlines()))
    assert any(r["source"] == "ours" and r["seed"] == "7" for r in written)  # the new seed is in the table


@pytest.mark.parametrize(
    ("table", "narrowed", "record"),
    [
        ("table1", ["--tasks", "metamath", "--cells", "fft", "--seeds", "0", "--set", "train.warmup=3"], "fft-"),
        ("table2", ["--cells", "fft", "--seeds", "9", "--set", "train.steps=20", "train.eval_steps=[20]"], "base"),
    ],
)
def test_a_run_that_would_replace_a_kept_record_of_another_config_stops_with_one_line(
    tmp_path, capsys, table, narrowed, record
):
    out, before = _copy(tmp_path, TABLES[table][0])
    with pytest.raises(SystemExit) as stopped:
        _reproduce(table, tmp_path, out, *narrowed)
    line = str(stopped.value.code)
    assert line.startswith("error: ") and "\n" not in line and "keeps a run of that name with another config" in line
    assert f"/{record}" in line and "OUT=" in line
    assert _files(out) == before and not (tmp_path / "runs").exists()
