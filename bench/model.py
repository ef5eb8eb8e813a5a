"""Whole-model training steps (forward, backward, AdamW) of a tiny and a ~100M-parameter LLaMA for FFT, LoRA r=8 and
every MoRA operator at r=8, with dropout 0 and 0.05: median step time and its ratio to LoRA, peak memory (RSS above
the built model, one fresh process per variant) and the bytes autograd saves for backward (unique storages).

    python bench/model.py [--models tiny 100m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_case, write  # noqa: E402
from mora.adapters.build import build_adapter  # noqa: E402
from mora.adapters.mora import COMPRESSIONS  # noqa: E402

MODELS = {
    "tiny": (
        {
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 512,
        },
        8,
        64,
    ),
    "100m": (
        {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 8,
            "num_attention_heads": 12,
            "vocab_size": 32000,
        },
        4,
        128,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["fft", "lora", *COMPRESSIONS]


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(storages.values())


def one_case(model_name: str, variant: str, dropout: float, repeats: int) -> dict:
    fields, batch_size, seq = MODELS[model_name]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields, num_key_value_heads=fields["num_attention_heads"]))
    if variant == "fft":
        cfg = {"method": "fft"}
    elif variant == "lora":
        cfg = {"method": "lora", "r": 8, "alpha": 16, "dropout": dropout, "target_modules": TARGETS}
    else:
        cfg = {"method": "mora", "r": 8, "compression": variant, "dropout": dropout, "target_modules": TARGETS}
    adapted = build_adapter(model, cfg, seed=0)
    optimizer = adapted.optimizer(lr=1e-4)
    ids = torch.randint(0, fields["vocab_size"], (batch_size, seq))
    batch = {"input_ids": ids, "labels": ids}
    adapted.model.train()
    saved = saved_bytes(adapted.model, batch)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        adapted.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up, allocates gradients and optimizer state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {
        "model": model_name,
        "variant": variant,
        "dropout": dropout,
        "tokens": batch_size * seq,
        "trainable": adapted.trainable_parameters(),
        "step_s": statistics.median(times),
        "peak_extra_bytes": peak,
        "saved_for_backward_bytes": saved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "VARIANT", "DROPOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], args.case[1], float(args.case[2]), args.repeats)))
        return
    rows = []
    for model_name in args.models:
        for dropout in (0.0, 0.05):
            for variant in VARIANTS:
                if variant == "fft" and dropout:
                    continue
                row = run_case(__file__, model_name, variant, str(dropout), "--repeats", str(args.repeats))
                if row is not None:
                    rows.append(row)
    lora = {(r["model"], r["dropout"]): r for r in rows if r["variant"] == "lora"}
    lines = [
        f"# Whole-model training step (float32, CPU threads: {torch.get_num_threads()})",
        "",
        "Forward + backward + AdamW, median of the timed steps after one warm-up, one fresh process per row. Ratios "
        "are to LoRA r=8 with the same dropout (FFT: to LoRA with dropout 0). `peak extra`: peak RSS above the "
        "built model; `saved`: bytes autograd keeps for backward.",
        "",
        "| model | variant | dropout | trainable | step (s) | step / LoRA | peak extra (MiB) | peak / LoRA | "
        "saved (MiB) | saved / LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = lora.get((row["model"], row["dropout"]))
        if ref is None:
            continue
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['dropout']} | {row['trainable']:,} | {row['step_s']:.3f} | "
            f"{row['step_s'] / ref['step_s']:.3f} | {row['peak_extra_bytes'] / 2**20:.1f} | "
            f"{row['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.3f} | "
            f"{row['saved_for_backward_bytes'] / 2**20:.1f} | "
            f"{row['saved_for_backward_bytes'] / ref['saved_for_backward_bytes']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    write("model", {"rows": rows}, table)


if __name__ == "__main__":
    main()
