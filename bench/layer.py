"""Per-layer speed: forward and forward+backward of one LLaMA-7B-shaped layer, frozen base alone vs LoRA (PEFT),
DoRA (PEFT) and every MoRA operator, with the input requiring grad as inside a model. Ratios to the base layer,
each timed against the base in the same round (rounds interleaved in one process; median over rounds),
beside each variant's FLOP floor. MoRA runs on each path of `--paths` (the eager in-place path, the compiled GPU
path: mora.adapters.compiled; default both on a GPU, eager on the CPU); `first s` is each variant's first
forward+backward, which holds the compilation of a compiled one.

    python bench/layer.py                       # LLaMA-7B shapes, 2x256 and 1x2048 tokens, float32
    python bench/layer.py --tokens 2x256 1x2048 --dtype bfloat16 --repeats 5
    python bench/layer.py --device cuda --dtype bfloat16 --operators sharing rope --baselines lora --repeats 50 \
        --warmup 5 --out DIR                  # one GPU, CUDA-event timing (scripts/gpu_check.py runs this)
    python bench/layer.py --paths compiled eager --shapes 512x512 --tokens 1x256   # both paths on the CPU

Results are rewritten after every shape x tokens, so a run stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    LLAMA_SHAPES,
    RESULTS,
    floor_ratio,
    interleaved_times,
    paired_ratios,
    write,
)
from mora import MoraConfig  # noqa: E402
from mora.adapters import compiled  # noqa: E402
from mora.adapters.mora import COMPRESSIONS  # noqa: E402
from mora.adapters.peft_tuner import MoraLinear  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


BASELINES = ("lora", "dora")
PATHS = {"compiled": "on", "eager": "off"}  # a path -> its MORA_COMPILE setting


def variants(
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    ranks: list[int],
    operators: list[str],
    baselines: tuple[str, ...] = BASELINES,
    device: torch.device | None = None,
    paths: tuple[str, ...] = ("eager",),
) -> dict:
    """name -> (module, method, r, r_hat, path): MoRA once per path (named with it where there are several)"""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, dtype=dtype).requires_grad_(False)
    out = {"base": (base, "base", 0, None, None)}
    for r in ranks if "lora" in baselines else []:
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0)
        lora = LoraLinear(copy.deepcopy(base), "default", config, r=r, lora_alpha=2 * r)
        nn.init.normal_(lora.lora_B["default"].weight, std=0.01)
        out[f"lora r={r}"] = (lora.to(dtype), "lora", r, None, None)
    if "dora" in baselines:
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True)
        dora = LoraLinear(copy.deepcopy(base), "default", config, r=8, lora_alpha=16)
        out["dora r=8"] = (dora.to(dtype), "dora", 8, None, None)
    for op in operators:
        for r in ranks:
            try:
                layer = MoraLinear(copy.deepcopy(base), "default", MoraConfig(r=r, compression=op, init_weights=False))
            except ValueError:
                continue  # the operator refuses this shape (e.g. truncation with r_hat > min(d_in, d_out))
            for path in paths:
                name = f"{op} r={r}" + (f" {path}" if len(paths) > 1 else "")
                out[name] = (layer.to(dtype), op, r, layer.mora_r_hat["default"], path)
    return {name: (module.to(device), *rest) for name, (module, *rest) in out.items()}


def bench_shape(
    d_in: int,
    d_out: int,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    ranks: list[int],
    operators: list[str],
    repeats: int,
    baselines: tuple[str, ...] = BASELINES,
    device: torch.device | None = None,
    warmup: int = 1,
    paths: tuple[str, ...] = ("eager",),
) -> list[dict]:
    device = device or torch.device("cpu")
    layers = variants(d_in, d_out, dtype, ranks, operators, baselines, device, paths)
    x = torch.randn(batch, seq, d_in, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(batch, seq, d_out, dtype=dtype, device=device)

    def on_path(module, path):
        def call():
            if path is not None:  # the layer reads its path from MORA_COMPILE at every call
                os.environ[compiled.ENV] = PATHS[path]
            return module(x)

        return call

    def forward_backward(module, path):
        def step():
            on_path(module, path)().backward(grad)
            x.grad = None
            for p in module.parameters():
                p.grad = None

        return step

    first, failed = {}, {}
    for name, (module, *_, path) in layers.items():  # compiles a compiled variant's graphs, timed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            forward_backward(module, path)()
        except torch._dynamo.exc.BackendCompilerFailed as error:  # MORA_COMPILE=on: said, and the others timed
            failed[name] = compiled.describe(error)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first[name] = time.perf_counter() - start
    timed = {name: layer for name, layer in layers.items() if name not in failed}
    fwd = interleaved_times({n: on_path(m, p) for n, (m, *_, p) in timed.items()}, repeats, warmup, device)
    both = interleaved_times({n: forward_backward(m, p) for n, (m, *_, p) in timed.items()}, repeats, warmup, device)
    fwd_ratio, both_ratio = paired_ratios(fwd, "base"), paired_ratios(both, "base")
    rows = []
    for name, (_, method, r, r_hat, path) in layers.items():
        row = {"shape": f"{d_in}->{d_out}", "tokens": f"{batch}x{seq}", "variant": name, "method": method}
        row |= {"path": path, "r": r, "r_hat": r_hat}
        if name in failed:
            rows.append(row | {"failed": failed[name]})
            continue
        rows.append(
            row
            | {
                "first_s": first[name],
                "fwd_s": statistics.median(fwd[name]),
                "fwd_bwd_s": statistics.median(both[name]),
                "fwd_ratio": fwd_ratio[name],
                "fwd_bwd_ratio": both_ratio[name],
                "fwd_bwd_round_ratios": [t / b for t, b in zip(both[name], both["base"], strict=True)],
                "floor": floor_ratio(method, d_in, d_out, r, r_hat),
            }
        )
    return rows


def markdown(rows: list[dict], dtype: str, device: torch.device) -> str:
    where = f"CPU threads: {torch.get_num_threads()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    timing = "wall clock" if device.type == "cpu" else "CUDA events"
    lines = [
        f"# Per-layer speed ({dtype}, {where})",
        "",
        f"Ratio of each variant's time ({timing}) to the frozen base layer's in the same round (rounds interleaved "
        "in one process), median over rounds, with the rounds' range; "
        "`floor` is the forward+backward FLOP floor 1 + extra / (4 d_in d_out) (backward of a frozen base is dx only); "
        "`first s`: the variant's first forward+backward, a compiled path's compilation included.",
        "",
        "| shape | tokens | variant | r_hat | fwd ratio | fwd+bwd ratio | rounds (min–max) | floor | gap to floor "
        "(points) | first s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(
                f"| {row['shape']} | {row['tokens']} | {row['variant']} | {row['r_hat'] or ''} | "
                f"did not compile: {row['failed']} | – | – | – | – | – |"
            )
            continue
        gap = 100 * (row["fwd_bwd_ratio"] - row["floor"])
        rounds = row["fwd_bwd_round_ratios"]
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['variant']} | {row['r_hat'] or ''} | {row['fwd_ratio']:.3f} | "
            f"{row['fwd_bwd_ratio']:.3f} | {min(rounds):.3f}–{max(rounds):.3f} | {row['floor']:.3f} | {gap:+.1f} | "
            f"{row['first_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", default=["2x256", "1x2048"], help="batch x sequence")
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in LLAMA_SHAPES], help="d_in x d_out")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--operators", nargs="+", default=list(COMPRESSIONS), choices=COMPRESSIONS)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--paths", nargs="+", choices=PATHS, help="MoRA's paths (default: both on cuda, else eager)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--name", default=None, help="output name (default layer_<dtype>, layer_<dtype>_cuda on a GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default results/bench)")
    args = parser.parse_args()
    device = torch.device(args.device)
    paths = tuple(args.paths or (PATHS if device.type == "cuda" else ["eager"]))
    name = args.name or f"layer_{args.dtype}" + ("_cuda" if device.type == "cuda" else "")
    rows = []
    for shape in args.shapes:
        d_in, d_out = map(int, shape.split("x"))
        for tokens in args.tokens:
            batch, seq = map(int, tokens.split("x"))
            sizes = (d_in, d_out, batch, seq, DTYPES[args.dtype], args.ranks, args.operators, args.repeats)
            rows += bench_shape(*sizes, tuple(args.baselines), device, args.warmup, paths)
            print(f"done {shape} {tokens}", flush=True)
            payload = {"dtype": args.dtype, "device": str(device), "rows": rows}
            write(name, payload, markdown(rows, args.dtype, device), args.out, quiet=True)  # kept if stopped later
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
