"""Prompt formats shared by a training recipe and the evaluation of the model it trains.

Alpaca (the authors' `train.py` / `training_utils.py` for MetaMath, PAPER.md §2.4): the first line of a query
is the instruction, any later lines the input (which switches to the template with an "### Input:" section); the
target is the response.
"""

from __future__ import annotations

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def alpaca_prompt(query: str) -> str:
    """The Alpaca prompt of a query: first line -> instruction, the rest -> input."""
    instruction, _, rest = query.partition("\n")
    if rest:  # as the authors' training_utils.py: any text after the first newline is the input
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=rest)
    return ALPACA.format(instruction=instruction)
