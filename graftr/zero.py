"""DeepSpeed ZeRO helpers.

Under ZeRO-3 every parameter of the engine's module is a placeholder holding no data outside the forward and
backward of its module (``p.numel() == 0``; the real values are partitioned across ranks), so a state dict taken
from it is empty. :func:`gathered_adapter_state` gathers the trainable tensors (adapters and the recipe's
trainable modules) one by one into full CPU copies, under any ZeRO stage or none.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters of ``model`` (a DeepSpeed engine or the module it wraps).

    Names are the model's parameter names, as :meth:`graftr.grafted.GraftedModel.adapter_state_dict` gives them.
    Under ZeRO-3 each parameter is all-gathered, which is a collective: call this on every rank (and save on one).
    The values are the module's copies, in the dtype it trains in.
    """
    deepspeed = sys.modules.get("deepspeed")  # a model can only be partitioned if deepspeed is imported
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        model = model.module
    state = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # a ZeRO-3 parameter; the same order on every rank keeps the gathers matched
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.detach().to("cpu", copy=True)
        else:
            state[name] = p.detach().to("cpu", copy=True)
    return state
