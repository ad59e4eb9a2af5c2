"""InA: inhibition adaption — LoRA with a per-token threshold and a non-linearity between the two projections.

Kang et al., "InA: Inhibition Adaption on pre-trained language models", Neural Networks 178:106410, 2024
(code: https://github.com/ChengKang520/inhibited-lora). For a targeted linear layer ``y = W0 x + b0``::

    z  = A · dropout(x)                 A ∈ R^{r×in}     (lora_A)
    Th = p · max_over_rank(z)           per token, keepdim; not detached: the gradient reaches the arg-max of z
    u  = f(z − Th)                      threshold first, then activation
    y  = W0 x + b0 + s · B u            B ∈ R^{out×r}    (lora_B),  s = alpha / r

``p`` is the inhibition level (the paper's Inh_p). ``p = 0`` is plain LoRA with **no activation**, as in the
official code (so the output jumps at p → 0). z and Th come from the same dropout sample.

Paper vs code: the paper text names GeLU for ``f``; the code that produced the published results uses
leaky_relu (slope 0.01). graftr defaults to leaky_relu and offers ``gelu`` (and relu, silu, tanh, identity).

Init as LoRA (``init: lora``): A kaiming-uniform with a=√5, i.e. U(−1/√in, 1/√in), B zeros, so the adapted model
equals the base at start. ``init: gaussian``: A ~ N(0, std 1/r) as PEFT's ``init_lora_weights="gaussian"``, B zeros.

The adapter computes in its own dtype (``dtype``, fp32 by default) and casts the result back to the activation
dtype. Merging is exact only for p = 0 (LoRA's ``W0 + s·B·A``); for p > 0 it is refused, because the per-token
threshold and the activation cannot be folded into a weight (the official code silently merges ``s·B·A`` anyway).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from graftr.adapters.base import LinearAdapter
from graftr.errors import MergeError
from graftr.names import DTYPES
from graftr.registry import AdapterConfig, TrainingDefaults, register_adapter

ACTIVATIONS = {
    "leaky_relu": lambda t: F.leaky_relu(t, negative_slope=0.01),  # the official code
    "gelu": F.gelu,  # the paper text (exact, erf-based GeLU)
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


class InAConfig(AdapterConfig):
    # the official GLUE commands (InA_GLUE.batch: run_glue.py without --learning_rate) train with HF
    # TrainingArguments' defaults: lr 5e-5, linear decay, no warmup, no weight decay
    training_defaults = TrainingDefaults(lr=5e-5, lr_schedule="linear",
                                         source="InA's official GLUE commands (run_glue.py, HF Trainer defaults)")
    kind: Literal["ina"] = "ina"
    rank: int = Field(8, ge=1, description="r, the inner dimension")
    alpha: float = Field(16, gt=0, description="the branch is scaled by s = alpha / rank")
    inhibition: float = Field(0.3, ge=0, le=1, description="p; 0 is plain LoRA (no threshold, no activation)")
    activation: Literal["leaky_relu", "gelu", "relu", "silu", "tanh", "identity"] = Field(
        "leaky_relu", description="f; leaky_relu (slope 0.01) as the official code, gelu as the paper text")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input x")
    init: Literal["lora", "gaussian"] = Field("lora", description="A kaiming-uniform (lora) or N(0, 1/r²); B zeros")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of A, B and the branch")

    @model_validator(mode="after")
    def _warn_unused_activation(self) -> InAConfig:
        if self.inhibition == 0 and self.activation != "leaky_relu":
            warnings.warn(f"ina: activation {self.activation!r} has no effect with inhibition 0 (plain LoRA, "
                          "no activation, as in the official code)", UserWarning, stacklevel=2)
        return self


def _merge_refusal(inhibition: float) -> str | None:
    if inhibition == 0:
        return None
    return (f"ina with inhibition {inhibition} cannot be merged: its per-token threshold p·max(A x) and the "
            "activation depend on the input and cannot be folded into a weight (the official code silently merges "
            "s·B·A, which is a different model); only inhibition 0 (plain LoRA) merges")


@register_adapter(InAConfig, ops=("linear",))
class InA(LinearAdapter):
    position = "output"

    def __init__(self, in_features: int, out_features: int, config: InAConfig, device=None):
        super().__init__()
        dtype = DTYPES[config.dtype]
        self.rank, self.inhibition, self.activation = config.rank, config.inhibition, config.activation
        self.scaling = config.alpha / config.rank
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout)
        if config.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        else:
            nn.init.normal_(self.lora_A, std=1 / config.rank)

    @classmethod
    def from_site(cls, config: InAConfig, site, *, device):
        return cls(site.in_features, site.out_features, config, device)

    def forward(self, x, y):
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if self.inhibition > 0:
            threshold = self.inhibition * z.max(dim=-1, keepdim=True).values
            z = ACTIVATIONS[self.activation](z - threshold)
        # s folded into the (out, r) matrix, not applied to the (B, T, out) branch: backward then passes the output
        # gradient straight through the add, with no full-size multiply (PEFT's `result + B(A x) * s` has two)
        return (y + F.linear(z, self.lora_B * self.scaling)).to(y.dtype)

    @classmethod
    def merge_refusal(cls, config: InAConfig) -> str | None:
        return _merge_refusal(config.inhibition)

    def check_merge(self) -> None:
        if (reason := _merge_refusal(self.inhibition)) is not None:
            raise MergeError(reason)

    def merge_into(self, weight, bias, layout):
        self.check_merge()
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
        if layout == "in_out":  # Conv1D stores W as (in, out)
            delta = delta.T
        return (weight.float() + delta.to(weight.device)).to(weight.dtype), bias

    def extra_repr(self) -> str:
        return (f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, rank={self.rank}, scaling={self.scaling:g}, "
                f"inhibition={self.inhibition}, activation={self.activation if self.inhibition > 0 else 'none'}")
