"""Perplexity of a causal LM on packed token blocks (Table 3: C4 validation perplexity).

    loss = sum of next-token cross-entropies over every block / number of predicted tokens   (block_size - 1 each)
    ppl  = exp(loss)

Token-weighted over the whole set (ReLoRA's script averages per-batch means of per-document padded sequences;
with full blocks of equal length the two agree up to the last, smaller batch). In a multi-process run each process
scores every world-th block and the sums are all-reduced; every process runs the same number of forwards (ZeRO-3
gathers parameters in each), running an uncounted batch where its share runs out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mora.evaluation.processes import rank_world


def block_loss_sum(model: torch.nn.Module, input_ids: Tensor) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropies, predicted tokens) of a batch of full blocks (batch, block)."""
    logits = model(input_ids=input_ids).logits  # (batch, block, vocab)
    targets = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return loss, targets.numel()


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: Tensor, batch_size: int) -> dict[str, float]:
    """{"loss", "ppl", "tokens"} of the model on blocks (n, block_size) of token ids."""
    if len(blocks) == 0:
        raise ValueError("no validation block to score; the validation split is shorter than one block")
    rank, world = rank_world()
    device = next(model.parameters()).device
    mine = blocks[rank::world]
    n_batches = math.ceil(math.ceil(len(blocks) / world) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        batch = mine[b * batch_size : (b + 1) * batch_size]
        if len(batch) == 0:  # this process's share ran out: a forward anyway (ZeRO-3), not counted
            block_loss_sum(model, blocks[:1].to(device))
            continue
        loss, tokens = block_loss_sum(model, batch.to(device))
        total += torch.stack([loss.double(), torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    loss = float(total[0] / total[1])
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(total[1])}
