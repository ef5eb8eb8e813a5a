"""lm-eval's HF wrapper around our in-memory model, with one addition: every loglikelihood result also carries the
number of continuation tokens it scored, so that AdaptLLM's classification tasks can pick the option with the
lowest mean per-token loss (their rule) rather than lm-eval's per-character normalisation."""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM


class LoglikelihoodResult(tuple):
    """(logprob, is_greedy), as lm-eval expects, with the continuation's token count as `num_tokens`."""

    num_tokens: int

    def __new__(cls, result: tuple[float, bool], num_tokens: int) -> LoglikelihoodResult:
        self = super().__new__(cls, result)
        self.num_tokens = num_tokens
        return self


class TokenCountingLM(HFLM):
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[LoglikelihoodResult]:
        results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return [LoglikelihoodResult(r, len(req[2])) for r, req in zip(results, requests, strict=True)]


def wrap(model: torch.nn.Module, tokenizer: Any, batch_size: int, max_length: int | None = None) -> HFLM:
    """The lm-eval model object of an in-memory model (a PeftModel works: merged or not). Every context starts with
    <s>, as every training example does (lm-eval leaves it out of causal models unless asked)."""
    device = next(model.parameters()).device
    return TokenCountingLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        max_length=max_length,
        add_bos_token=True,
    )
