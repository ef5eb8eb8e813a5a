"""Does an adapter merge: the time PEFT's `merge_adapter` takes on a trained model, and whether the merged model's
logits equal the unmerged one's on a fixed batch (a method whose merge drifts, or does not exist, says so here)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

# the largest difference of logits counted as equal: float32 rounding of W + dW, relative to the logits' scale
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def merge_check(model: nn.Module, vocab_size: int, tokens: int = 32) -> dict[str, Any]:
    """merge_s (wall seconds of `merge_adapter`), merge_rel_diff (the largest change of a logit, relative to the
    largest logit) and merge_equal (within TOLERANCE of the model's dtype), on two sequences of fixed random tokens.
    The model is unmerged again before it returns. A model PEFT cannot merge: {"merge_error": its message}."""
    parameter = next(model.parameters())
    ids = torch.randint(0, vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0)).to(parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids).logits.float()
            _synchronize(parameter.device)
            started = time.perf_counter()
            try:
                model.merge_adapter()
            except (NotImplementedError, ValueError, RuntimeError) as error:
                return {"merge_error": f"{type(error).__name__}: {error}".splitlines()[0]}
            _synchronize(parameter.device)
            seconds = time.perf_counter() - started
            after = model(input_ids=ids).logits.float()
            model.unmerge_adapter()
    finally:
        model.train(was_training)
    diff = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    return {
        "merge_s": round(seconds, 4),
        "merge_rel_diff": diff,
        "merge_equal": diff <= TOLERANCE.get(parameter.dtype, 1e-4),
    }
