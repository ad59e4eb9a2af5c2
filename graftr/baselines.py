"""PEFT methods trained by graftr's own loop: the like-for-like baselines of ``graftr compare``.

A :class:`PeftBaseline` stands where a recipe stands in :func:`graftr.train.loop.train`: the loop resolves the model,
tokenizes the data, batches, schedules, steps DeepSpeed, evaluates and records exactly as for a recipe; only the
model differs. :func:`build` loads the HF model with its weights (``from_pretrained``, in the training dtype) and
wraps it with ``peft.get_peft_model`` from the baseline's PEFT config (the fields of an ``adapter_config.json``,
``peft_type`` included); the loss is the HF model's own (transformers' ``ForCausalLMLoss`` over the step's labels,
``num_items_in_batch`` as graftr's), computed from full logits as a PEFT user's loop computes it. :func:`save`
writes the trained adapter in PEFT's format.

A baseline has no adapter kind, hence no published training defaults: its ``train:`` settings are given in full
(``graftr compare`` takes them from the graftr method of the same family).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftr.errors import GraftrError

# graftr's task names -> PEFT's TaskType values
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM", "token_cls": "TOKEN_CLS"}


@dataclass
class PeftBaseline:
    """A PEFT method in the place of a recipe (``graftr.train.loop.train`` reads ``name``, ``train``, ``task``,
    ``num_labels`` and ``model`` from it)."""

    name: str
    peft: dict[str, Any]  # a PEFT config: adapter_config.json's fields, peft_type included
    train: Any  # graftr.train.config.TrainConfig, lr set
    task: str | None = None
    num_labels: int | None = None
    model: str | None = None
    rules: tuple = field(default=())  # no graftr rules, so no adapter kind's training defaults

    def config(self, task: str):
        """The ``peft.PeftConfig`` (task_type from the model's task when the config leaves it out)."""
        from peft import get_peft_config

        fields = {"task_type": _TASK_TYPES.get(task), **self.peft}
        try:
            return get_peft_config(fields)
        except (KeyError, TypeError, ValueError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraftrError(f"{self.name}: not a PEFT config ({text})") from None


def build(run, baseline: PeftBaseline, data, device: torch.device) -> nn.Module:
    """The HF model of ``data.source`` with its weights, wrapped by PEFT as ``baseline`` says, in training mode."""
    from peft import get_peft_model

    from graftr.models import load_model
    from graftr.names import torch_dtype

    config = baseline.config(data.task)
    model = load_model(data.source, data.task, dtype=torch_dtype(run.cfg.precision), num_labels=data.num_labels)
    if data.label_names is not None:
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    try:
        model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:  # targets that match nothing, a method the model lacks
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraftrError(f"{baseline.name}: PEFT cannot apply {config.peft_type} to {data.source.model_id}: "
                          f"{text}") from None
    return model.to(device).train()


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a PEFT model, each tensor once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def save(model: nn.Module, out: Path, tensors: dict[str, torch.Tensor], extra: dict) -> None:
    """Write the trained adapter in PEFT's format into ``out`` (``tensors``: the trainable tensors by the model's
    parameter names, full fp32), with the run's summary beside it (``training.json``)."""
    from graftr.formats.files import write_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=tensors)
        (tmp / "training.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")

    write_dir_atomically(Path(out), write, marker="adapter_config.json", force=True)
