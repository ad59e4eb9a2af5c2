"""The names users write for tasks and dtypes, defined once.

A task names the head a model is built with (``recipe.task``, ``--model``'s inferred task); a dtype is spelled
``float32``/``bfloat16``/``float16`` on the command line and in adapter configs, and ``fp32``/``bf16``/``fp16`` in
``train.precision`` (DeepSpeed's spelling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where a dtype is built: recipes validate without it
    import torch

TASKS = ("causal_lm", "seq2seq_lm", "seq_cls", "token_cls", "masked_lm")
Task = Literal[TASKS]  # the recipe's `task:` field
LM_TASKS = ("causal_lm", "masked_lm", "seq2seq_lm")  # a token-level cross-entropy over the vocabulary
GENERATIVE_TASKS = ("causal_lm", "seq2seq_lm")  # `graftr generate`
CLASSIFICATION_TASKS = ("seq_cls", "token_cls")  # a head with num_labels outputs

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision, by its dtype


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a name in either spelling stands for: ``bfloat16`` or ``bf16`` → ``torch.bfloat16``."""
    import torch

    return getattr(torch, PRECISIONS.get(name, name))
