"""IA³: learned scaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", https://arxiv.org/abs/2205.05638; HF PEFT ``IA3``).

One vector ``l``, initialised to ones, per targeted linear layer ``y = W x + b``:

* ``scale: output`` (attention-type sites: k_proj, v_proj, ...):  ``y = (W x + b) ⊙ l``,  ``l ∈ R^out`` (bias scaled too)
* ``scale: input`` (feed-forward sites: down_proj, fc2, wo, ...): ``y = W (x ⊙ l) + b``,  ``l ∈ R^in``

``l`` is kept in fp32 on any base dtype; the product is cast back to the activation dtype. Merging folds ``l``
into the rows (output) or columns (input) of ``W``; it is exact up to rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from graftr.adapters.base import LinearAdapter
from graftr.registry import AdapterConfig, TrainingDefaults, register_adapter


class IA3Config(AdapterConfig):
    # T-Few (r-three/t-few configs/ia3.json and src/utils/Config.py): lr 3e-3, linear decay with 6% warmup, no decay
    training_defaults = TrainingDefaults(lr=3e-3, lr_schedule="linear", warmup_ratio=0.06,
                                         source="IA³'s T-Few recipe (Liu et al. 2022)")
    kind: Literal["ia3"] = "ia3"
    scale: Literal["output", "input"] = "output"
    """``output`` for attention-type sites, ``input`` for feed-forward sites (PEFT's ``feedforward_modules``)."""


@register_adapter(IA3Config, ops=("linear",))
class IA3(LinearAdapter):
    is_scaling = True

    def __init__(self, features: int, scale: str, device=None):
        super().__init__()
        self.position = scale
        self.ia3_l = nn.Parameter(torch.ones(features, dtype=torch.float32, device=device))

    @classmethod
    def from_site(cls, config: IA3Config, site, *, device):
        return cls(site.out_features if config.scale == "output" else site.in_features, config.scale, device)

    def forward(self, x, y=None):
        if self.position == "input":
            return (x * self.ia3_l).to(x.dtype)
        return (y * self.ia3_l).to(y.dtype)

    def check_merge(self) -> None:
        return None

    def merge_into(self, weight, bias, layout):
        # in fp32 and rounded once: on a bf16 base, rounding l first would move ~30% of the weights by one ulp
        l = self.ia3_l.float().to(weight.device)
        rows = (self.position == "output") == (layout == "out_in")  # which axis of W carries the scaled features
        merged = (weight.float() * (l[:, None] if rows else l[None, :])).to(weight.dtype)
        if bias is not None and self.position == "output":
            bias = (bias.float() * l).to(bias.dtype)
        return merged, bias

    def extra_repr(self) -> str:
        return f"{self.position}, features={self.ia3_l.numel()}"
