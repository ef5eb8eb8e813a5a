"""The benchmarks' own logic, at tiny sizes on the CPU (their figures come from `make bench` and the GPU check)."""

import pytest
import torch

from bench.layer import bench_shape, markdown
from mora.adapters import compiled


def test_the_layer_benchmark_times_the_other_variants_where_one_cannot_compile(monkeypatch):
    # on a GPU this path has not met, one operator's graph may fail in inductor or Triton: the GPU check's layer part
    # must still time every other variant, and say which one did not compile and why
    calls = []

    def first_graph_fails(gm, example_inputs):  # sharing's graph, the first compiled; rope's then runs as traced
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no kernel for this GPU")
        return gm

    monkeypatch.setattr(compiled, "BACKEND", first_graph_fails)
    monkeypatch.setenv(compiled.ENV, "off")  # restored afterwards: the benchmark sets it per variant
    torch._dynamo.reset()
    rows = bench_shape(
        32, 48, 1, 8, torch.float32, [2], ["sharing", "rope"], 2, ("lora",), None, 0, ("compiled", "eager")
    )
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == [
        "base",
        "lora r=2",
        *(f"{op} r=2 {p}" for op in ("sharing", "rope") for p in ("compiled", "eager")),
    ]
    assert by_name["sharing r=2 compiled"]["failed"] == "RuntimeError: no kernel for this GPU"
    assert "fwd_bwd_ratio" not in by_name["sharing r=2 compiled"]
    timed = [row for name, row in by_name.items() if name != "sharing r=2 compiled"]
    assert all("failed" not in row and row["fwd_bwd_ratio"] > 0 and row["first_s"] > 0 for row in timed)
    assert by_name["base"]["fwd_bwd_ratio"] == pytest.approx(1.0)
    assert len(calls) == 2  # rope's compiled variant compiled after sharing's failed
    table = markdown(rows, "float32", torch.device("cpu"))
    assert (
        "| 32->48 | 1x8 | sharing r=2 compiled | 13 | did not compile: RuntimeError: no kernel for this GPU |" in table
    )
    assert compiled.compile_failure() is None  # MORA_COMPILE=on: an error, not a fallback for the process
