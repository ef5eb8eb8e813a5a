"""Merge cost per layer and operator: time of delta_weight and of the merge (`add_delta_weight_`: W += dW in place,
what MoraLinear.merge runs), beside the time of one copy of the weight (the memory floor), and the peak extra
memory of the merge over the weight: on CPU the peak RSS of a fresh process per case, on CUDA the allocator's peak
(torch.cuda.max_memory_allocated) in one process, timed with CUDA events.

    python bench/merge.py [--ranks 8 256] [--repeats 3]
    python bench/merge.py --device cuda --dtype bfloat16 --operators sharing rope --repeats 20 --out DIR

Results are rewritten after every case, so a run stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    LLAMA_SHAPES,
    RESULTS,
    interleaved_medians,
    run_case,
    write,
)
from mora.adapters.inplace import add_delta_weight_  # noqa: E402
from mora.adapters.mora import (  # noqa: E402
    COMPRESSIONS,
    check_shapes,
    delta_weight,
    r_hat,
    rope_tables,
    surviving_chunks,
)
from mora.training.memory import peak_rss, reset_peak_rss  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def one_case(
    d_in: int, d_out: int, operator: str, r: int, repeats: int, device: str = "cpu", dtype: str = "float32"
) -> dict:
    """On CPU this runs in its own process, so that the peak RSS is this merge's alone; on CUDA the allocator's
    peak is reset per case."""
    torch.manual_seed(0)
    size = r_hat(d_in, d_out, r, operator)
    check_shapes(d_in, d_out, size, operator)
    on = torch.device(device)
    W = torch.randn(d_out, d_in, device=on, dtype=DTYPES[dtype])
    M = torch.randn(size, size, device=on, dtype=DTYPES[dtype]) * 0.01
    tables = rope_tables(size, surviving_chunks(d_in, d_out, size), on) if operator == "rope" else None
    if on.type == "cuda":
        torch.cuda.synchronize(on)
        torch.cuda.reset_peak_memory_stats(on)
        before = torch.cuda.memory_allocated(on)
        add_delta_weight_(W, M, operator, tables)  # what MoraLinear.merge runs
        peak_extra = torch.cuda.max_memory_allocated(on) - before
    else:
        before = reset_peak_rss()
        add_delta_weight_(W, M, operator, tables)
        peak_extra = peak_rss() - before
    times = interleaved_medians(
        {
            "copy": lambda: W.clone(),
            "delta_weight": lambda: delta_weight(M, d_in, d_out, operator, tables),
            "merge": lambda: add_delta_weight_(W, M, operator, tables),
        },
        repeats,
        device=on,
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
    parser.add_argument("--operators", nargs="+", default=list(COMPRESSIONS), choices=COMPRESSIONS)
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in LLAMA_SHAPES], help="d_in x d_out")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=None, help="output name (default merge, merge_cuda on a GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default results/bench)")
    parser.add_argument("--case", nargs=4, metavar=("D_IN", "D_OUT", "OPERATOR", "R"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        d_in, d_out, operator, r = args.case
        print(json.dumps(one_case(int(d_in), int(d_out), operator, int(r), args.repeats, dtype=args.dtype)))
        return
    cuda = torch.device(args.device).type == "cuda"
    name = args.name or ("merge_cuda" if cuda else "merge")
    where = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"CPU threads: {torch.get_num_threads()}"
    rows = []
    for shape in args.shapes:
        d_in, d_out = map(int, shape.split("x"))
        for operator in args.operators:
            for r in args.ranks:
                if cuda:
                    try:
                        row = one_case(d_in, d_out, operator, r, args.repeats, args.device, args.dtype)
                    except ValueError:  # the operator refuses the shape (e.g. truncation above min(d_in, d_out))
                        continue
                else:  # a fresh process per case: its peak RSS is this merge's alone
                    case = (str(d_in), str(d_out), operator, str(r), "--repeats", str(args.repeats))
                    row = run_case(__file__, *case, "--dtype", args.dtype)
                    if row is None:  # the operator refuses the shape
                        continue
                rows.append(row)
                payload = {"rows": rows, "dtype": args.dtype, "device": args.device}
                write(name, payload, markdown(rows, args.dtype, where), args.out, quiet=True)  # kept if stopped later
    print((args.out / f"{name}.md").read_text())


def markdown(rows: list[dict], dtype: str, where: str) -> str:
    lines = [
        f"# Merge cost per layer ({dtype}, {where})",
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
            f"| {row['shape']} | {row['operator']} | {row['r']} | {row['r_hat']} | {1e3 * row['copy_s']:.3f} | "
            f"{1e3 * row['delta_weight_s']:.3f} | {1e3 * row['merge_s']:.3f} | {row['merge_over_copy']:.2f} | "
            f"{row['peak_extra_over_weight']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
