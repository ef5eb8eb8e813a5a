"""Merge cost per layer and operator: time of delta_weight and of the merge (`add_delta_weight_`: W += dW in place,
what MoraLinear.merge runs), beside the time of one copy of the weight (the memory floor), and the peak extra
memory of the merge over the weight, measured in a fresh process per case (peak RSS).

    python bench/merge.py [--ranks 8 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LLAMA_SHAPES, interleaved_medians, peak_rss, reset_peak_rss, run_case, write  # noqa: E402
from mora.adapters.mora import (  # noqa: E402
    COMPRESSIONS,
    add_delta_weight_,
    check_shapes,
    delta_weight,
    r_hat,
    rope_tables,
    surviving_chunks,
)


def one_case(d_in: int, d_out: int, operator: str, r: int, repeats: int) -> dict:
    """Runs in its own process, so that the peak RSS is this merge's alone."""
    torch.manual_seed(0)
    size = r_hat(d_in, d_out, r, operator)
    check_shapes(d_in, d_out, size, operator)
    W = torch.randn(d_out, d_in)
    M = torch.randn(size, size) * 0.01
    tables = rope_tables(size, surviving_chunks(d_in, d_out, size)) if operator == "rope" else None
    before = reset_peak_rss()
    add_delta_weight_(W, M, operator, tables)  # what MoraLinear.merge runs
    peak_extra = peak_rss() - before
    times = interleaved_medians(
        {
            "copy": lambda: W.clone(),
            "delta_weight": lambda: delta_weight(M, d_in, d_out, operator, tables),
            "merge": lambda: add_delta_weight_(W, M, operator, tables),
        },
        repeats,
    )
    weight_bytes = W.numel() * W.element_size()
    return {
        "shape": f"{d_in}->{d_out}",
        "operator": operator,
        "r": r,
        "r_hat": size,
        "copy_s": times["copy"],
        "delta_weight_s": times["delta_weight"],
        "merge_s": times["merge"],
        "merge_over_copy": times["merge"] / times["copy"],
        "peak_extra_over_weight": peak_extra / weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=4, metavar=("D_IN", "D_OUT", "OPERATOR", "R"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        d_in, d_out, operator, r = args.case
        print(json.dumps(one_case(int(d_in), int(d_out), operator, int(r), args.repeats)))
        return
    rows = []
    for d_in, d_out in LLAMA_SHAPES:
        for operator in COMPRESSIONS:
            for r in args.ranks:
                row = run_case(__file__, str(d_in), str(d_out), operator, str(r), "--repeats", str(args.repeats))
                if row is not None:  # None: the operator refuses the shape (e.g. truncation above min(d_in, d_out))
                    rows.append(row)
    lines = [
        f"# Merge cost per layer (float32, CPU threads: {torch.get_num_threads()})",
        "",
        "`merge / copy`: median time of `add_delta_weight_(W, M)` (W += dW in place, what `merge()` runs) over the",
        "median time of `W.clone()` (one copy of the weight, the memory floor). `peak extra`: peak memory of the merge",
        "above the weight, in units of the weight.",
        "",
        "| shape | operator | r | r_hat | copy (ms) | delta_weight (ms) | merge (ms) | merge / copy | peak extra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['operator']} | {row['r']} | {row['r_hat']} | {1e3 * row['copy_s']:.1f} | "
            f"{1e3 * row['delta_weight_s']:.1f} | {1e3 * row['merge_s']:.1f} | {row['merge_over_copy']:.2f} | "
            f"{row['peak_extra_over_weight']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    write("merge", {"rows": rows}, table)


if __name__ == "__main__":
    main()
