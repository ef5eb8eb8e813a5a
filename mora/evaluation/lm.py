"""lm-eval's HF wrapper around our in-memory model, with two additions: every loglikelihood result also carries the
number of continuation tokens it scored, so that AdaptLLM's classification tasks can pick the option with the
lowest mean per-token loss (their rule) rather than lm-eval's per-character normalisation; and in a run of several
processes the evaluation is data-parallel (each process scores its share of the documents, lm-eval gathers the
per-document metrics on process 0), where lm-eval itself would have every process score everything for a model
it did not load."""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from mora.evaluation.processes import partitioned, rank_world


class LoglikelihoodResult(tuple):
    """(logprob, is_greedy), as lm-eval expects, with the continuation's token count as `num_tokens`."""

    num_tokens: int

    def __new__(cls, result: tuple[float, bool], num_tokens: int) -> LoglikelihoodResult:
        self = super().__new__(cls, result)
        self.num_tokens = num_tokens
        return self


class TokenCountingLM(HFLM):
    zero3 = False  # weights partitioned across processes: every generation steps until all processes are done

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        if self.zero3:
            kwargs.setdefault("synced_gpus", True)
        return super()._model_generate(context, max_length, stop, **kwargs)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[LoglikelihoodResult]:
        results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return [LoglikelihoodResult(r, len(req[2])) for r, req in zip(results, requests, strict=True)]


class _Processes:
    """What HFLM asks of its `accelerator` when it runs data-parallel: the model as it is (the engine passes it
    unwrapped), a gather of one tensor from every process, and a barrier."""

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import gather

        return gather(tensor)

    @staticmethod
    def wait_for_everyone() -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def wrap(model: torch.nn.Module, tokenizer: Any, batch_size: int, max_length: int | None = None) -> HFLM:
    """The lm-eval model object of an in-memory model (a PeftModel works: merged or not). Every context starts with
    <s>, as every training example does (lm-eval leaves it out of causal models unless asked).

    In a run of several processes it takes this process's rank and the world size (lm-eval's "custom distributed
    integration" of an already-built model), so that lm-eval splits the documents and pads the requests to the
    same count in every process. Under ZeRO-3 every process must also run the same number of forwards, since each
    one gathers the partitioned weights: lm-eval's logits cache, which merges requests that share a context and
    so gives a process with padding fewer forwards, is then off, and generation steps until every process is done.
    """
    rank, world = rank_world()
    zero3 = world > 1 and partitioned(model)
    device = next(model.parameters()).device
    lm = TokenCountingLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        max_length=max_length,
        add_bos_token=True,
        logits_cache=not zero3,
    )
    if world > 1:
        lm._rank, lm._world_size, lm.accelerator = rank, world, _Processes()
        lm.zero3 = zero3
    return lm
