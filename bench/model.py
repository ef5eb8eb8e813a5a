"""Whole-model training steps (forward, backward, AdamW) of a tiny and a ~100M-parameter LLaMA for FFT, LoRA r=8 and
every MoRA operator at r=8, with dropout 0 and 0.05: step time, its ratio to LoRA (all variants of a group stepped
round-robin in one process, per-round ratios), peak memory (RSS above the built model, one fresh process per
variant) and the bytes autograd saves for backward (unique storages).

    python bench/model.py [--models tiny 100m] [--repeats 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import interleaved_times, run_case, write  # noqa: E402
from mora.adapters.build import build_adapter  # noqa: E402
from mora.adapters.mora import COMPRESSIONS  # noqa: E402
from mora.training.memory import peak_rss, reset_peak_rss  # noqa: E402

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


def build(model_name: str, variant: str, dropout: float) -> tuple[torch.nn.Module, dict, Callable[[], None]]:
    """The adapted model, its batch, and one training step (forward, backward, AdamW)."""
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

    def step() -> None:
        adapted.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return adapted, batch, step


def one_case(model_name: str, variant: str, dropout: float, repeats: int) -> dict:
    adapted, batch, step = build(model_name, variant, dropout)
    saved = saved_bytes(adapted.model, batch)
    rss_before = reset_peak_rss()
    step()  # warm-up, allocates gradients and optimizer state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss() - rss_before
    return {
        "model": model_name,
        "variant": variant,
        "dropout": dropout,
        "tokens": batch["input_ids"].numel(),
        "trainable": adapted.trainable_parameters(),
        "step_s": statistics.median(times),
        "peak_extra_bytes": peak,
        "saved_for_backward_bytes": saved,
    }


def interleaved_step_ratios(model_name: str, dropout: float, variants: list[str], repeats: int) -> dict[str, list]:
    """Each variant's step time over LoRA's in the same round, all variants built in one process and stepped
    round-robin: the per-round ratios (their median is the table's ratio)."""
    steps = {variant: build(model_name, variant, dropout)[2] for variant in variants}
    times = interleaved_times(steps, repeats)
    return {name: [t / b for t, b in zip(ts, times["lora"], strict=True)] for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per fresh-process case")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved step timing")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "VARIANT", "DROPOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], args.case[1], float(args.case[2]), args.repeats)))
        return
    rows = []
    for model_name in args.models:
        for dropout in (0.0, 0.05):
            group = []
            for variant in VARIANTS:
                if variant == "fft" and dropout:
                    continue
                row = run_case(__file__, model_name, variant, str(dropout), "--repeats", str(args.repeats))
                if row is not None:
                    group.append(row)
            ratios = interleaved_step_ratios(model_name, dropout, [row["variant"] for row in group], args.rounds)
            for row in group:
                row["step_ratio_rounds"] = ratios[row["variant"]]
            rows += group
            print(f"done interleaved {model_name} dropout {dropout}", flush=True)
    lora = {(r["model"], r["dropout"]): r for r in rows if r["variant"] == "lora"}
    lines = [
        f"# Whole-model training step (float32, CPU threads: {torch.get_num_threads()})",
        "",
        "Forward + backward + AdamW. `step (s)`, `peak extra` (peak RSS above the built model) and `saved` (bytes "
        "autograd keeps for backward) come from one fresh process per row (median of the timed steps after one "
        "warm-up). `step / LoRA` is timed separately with every variant of a (model, dropout) group built in one "
        "process and stepped round-robin: the median over rounds of the step time over LoRA r=8's in the same "
        "round (same dropout; FFT: dropout 0), with the rounds' range.",
        "",
        "| model | variant | dropout | trainable | step (s) | step / LoRA | rounds (min–max) | peak extra (MiB) | "
        "peak / LoRA | saved (MiB) | saved / LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = lora.get((row["model"], row["dropout"]))
        if ref is None:
            continue
        rounds = row["step_ratio_rounds"]
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['dropout']} | {row['trainable']:,} | {row['step_s']:.3f} | "
            f"{statistics.median(rounds):.3f} | {min(rounds):.3f}–{max(rounds):.3f} | "
            f"{row['peak_extra_bytes'] / 2**20:.1f} | "
            f"{row['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.3f} | "
            f"{row['saved_for_backward_bytes'] / 2**20:.1f} | "
            f"{row['saved_for_backward_bytes'] / ref['saved_for_backward_bytes']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    write("model", {"rows": rows}, table)


if __name__ == "__main__":
    main()
