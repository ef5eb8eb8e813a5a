"""A finished run's saved adapter (or model), read back from its folder alone and evaluated as the run evaluated
its last step: the check that what a run leaves on disk is the model it reported on.

    python -m mora.training.reload runs/table2/tiny/mora-r8-lr0.01-s0      # prints both evaluations
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from mora.models import build_model, torch_dtype
from mora.tasks import build_task

TOLERANCE = 1e-4  # relative, on each score (the same weights give the same scores: a LoRA run's are bit-equal)


def reloaded(folder: Path) -> torch.nn.Module:
    """The trained model from folder/adapter: a PEFT adapter on its base (a pretrained model, or the model built
    from config with the run's seed, as the run built it), or a whole model (FFT, ReLoRA / ReMoRA: merged)."""
    from peft import PeftModel

    import mora  # noqa: F401  (registers MoRA with PEFT)

    cfg = OmegaConf.load(folder / "config.yaml")
    adapter = folder / "adapter"
    dtype = torch_dtype(str(cfg.model.dtype))
    if not (adapter / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype)
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    if not spec.get("pretrained"):
        spec["config"]["vocab_size"] = len(AutoTokenizer.from_pretrained(adapter))
    # in the dtype it was saved in: DeepSpeed trains a bf16 model's adapter in bf16, and PEFT's default load would
    # upcast it to float32 and compute it so, scoring differently from the run
    return PeftModel.from_pretrained(build_model(spec, seed=int(cfg.seed)), adapter, autocast_adapter_dtype=False)


def evaluate_saved(folder: Path) -> dict[str, Any]:
    """The run's last evaluation beside the reloaded model's, score by score, and whether they agree."""
    cfg = OmegaConf.load(folder / "config.yaml")
    summary = json.loads((folder / "summary.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "adapter")
    task = build_task(cfg.task, tokenizer)
    model = reloaded(folder).eval()
    scores = task.evaluate(model, int(cfg.train.eval_batch)) or {}
    scores.pop("details", None)
    ran = summary["evaluation"]["scores"]
    agree = set(scores) == set(ran) and all(abs(scores[k] - ran[k]) <= TOLERANCE * max(1.0, abs(ran[k])) for k in ran)
    return {"run": ran, "reloaded": scores, "agree": agree}


if __name__ == "__main__":
    result = evaluate_saved(Path(sys.argv[1]))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["agree"] else 1)
