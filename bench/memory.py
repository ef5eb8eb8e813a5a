"""Activation memory at LLaMA-7B's shapes: the bytes autograd keeps for backward, per token, in one decoder layer
(4096 wide, MLP 11008, 32 heads, every projection adapted, dropout 0, float32), for LoRA and MoRA's four operators at
r = 8 and 256, MoRA on its eager and its compiled path (issue #23).

Bytes, not time, so any machine gives the same figures for the eager path. The compiled path's saved tensors are
chosen by AOTAutograd's partitioner before any code is generated, so inductor's C++ here keeps what its Triton
would keep on a GPU (the partitioner is shared; the generated kernels are not). Per token: the growth of the kept
storages from one 64-token sequence to two (the model's weights, the adapters' and anything else that does not
grow with the tokens drop out).

    python bench/memory.py [--ranks 8 256] [--seq 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write  # noqa: E402
from bench.model import saved_bytes  # noqa: E402
from mora.adapters.build import build_adapter  # noqa: E402
from mora.adapters.compiled import ENV  # noqa: E402

LLAMA_7B_LAYER = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 1}
VOCAB = 256  # the embedding and head do not grow with the tokens' bytes kept per layer; kept small
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPERATORS = ["truncation", "sharing", "decouple", "rope"]
PATHS = {"eager": "off", "compiled": "on"}  # a path -> its MORA_COMPILE setting


def per_token(adapter: dict, seq: int) -> float:
    """Bytes kept for backward per token by one LLaMA-7B decoder layer with `adapter`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B_LAYER, num_key_value_heads=32, vocab_size=VOCAB))
    adapted = build_adapter(model, adapter, seed=0).model.train()
    kept = []
    for sequences in (1, 2):
        ids = torch.randint(0, VOCAB, (sequences, seq))
        kept.append(saved_bytes(adapted, {"input_ids": ids, "labels": ids}))
    return (kept[1] - kept[0]) / seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    args = parser.parse_args()
    rows = []
    for r in args.ranks:
        lora = {"method": "lora", "r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": TARGETS}
        rows.append({"method": "lora", "r": r, "operator": None, "path": "eager", "bytes": per_token(lora, args.seq)})
        for operator in OPERATORS:
            for path, setting in PATHS.items():
                os.environ[ENV] = setting
                mora = {"method": "mora", "r": r, "compression": operator, "dropout": 0.0, "target_modules": TARGETS}
                row = {"method": "mora", "r": r, "operator": operator, "path": path}
                rows.append(row | {"bytes": per_token(mora, args.seq)})
                print(rows[-1], flush=True)
    hidden = LLAMA_7B_LAYER["hidden_size"] * 4  # one float32 vector of the model's width
    lora_bytes = {row["r"]: row["bytes"] for row in rows if row["method"] == "lora"}
    lines = [
        "# Activation memory of one LLaMA-7B decoder layer (bytes kept for backward per token)",
        "",
        f"Every projection adapted, dropout 0, float32 (bf16 halves every figure), {args.seq}-token sequences. "
        "`per token` in KiB and in float32 vectors of the model's width (4096); `/ LoRA`: over LoRA's at the same "
        "r. The rest of the layer (attention, MLP, norms) keeps the same in every row.",
        "",
        "| method | r | operator | path | per token (KiB) | per token (width vectors) | / LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['r']} | {row['operator'] or '–'} | {row['path']} | {row['bytes'] / 1024:.1f} "
            f"| {row['bytes'] / hidden:.2f} | {row['bytes'] / lora_bytes[row['r']]:.3f} |"
        )
    write("memory", {"seq": args.seq, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
