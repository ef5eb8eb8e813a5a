"""`mora.load(path)`: a saved MoRA adapter on its base model, in one call, with no other setup."""

from __future__ import annotations

from typing import Any


def load(path: str, **kwargs: Any) -> Any:
    """The adapter at `path` (a folder or hub id) on the base model its config names (`base_model_name_or_path`),
    as the PEFT class of its task type (PeftModelForCausalLM for `task_type="CAUSAL_LM"`; a plain PeftModel for
    none). kwargs go to PEFT's `AutoPeftModel*.from_pretrained` and on to transformers (e.g. `dtype`,
    `low_cpu_mem_usage=True`, `is_trainable=True`)."""
    import peft

    by_task = {
        "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
        "SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
        "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
        "TOKEN_CLS": peft.AutoPeftModelForTokenClassification,
        "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering,
        "FEATURE_EXTRACTION": peft.AutoPeftModelForFeatureExtraction,
    }
    from .folder import check_folder

    check_folder(path, kwargs.get("subfolder"))  # before PEFT reads the config: one error type for a damaged folder
    config = peft.PeftConfig.from_pretrained(path)
    return by_task.get(config.task_type, peft.AutoPeftModel).from_pretrained(path, **kwargs)
