"""Bias and scale tuning of LLaMA-Adapter V2 (Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual
Instruction Model", https://arxiv.org/abs/2304.15010, §3.1 "bias tuning of linear layers").

For a targeted linear layer ``y = W x + b0`` (``b0`` the base's own bias, 0 when it has none)::

    y = s ⊙ (W x + b0 + b)          b ∈ R^out, init 0 (a new bias);  s ∈ R^out, init 1 (a per-feature scale)

so the adapted model equals the base at start. ``s`` and ``b`` are kept in fp32 on any base dtype; the result is
cast back to the activation dtype. The paper writes ``y = W·x → y = s·(W·x + b)`` on a base without biases
(LLaMA); on a base with a bias graftr keeps ``b0`` inside the scaled sum (litgpt's ``AdapterV2Linear``, the
text-only reference, computes ``s ⊙ (W x + b0 + b)`` the same way through its ``adapter_bias``/``adapter_scale``).

Merging is exact up to rounding: ``W ← diag(s) W`` (rows for ``nn.Linear``, columns for GPT-2's ``Conv1D``),
bias ``← s ⊙ (b0 + b)``. On a site without a bias, the merged graph gains one (a parameter at ``<site>.bias``);
a Hugging Face checkpoint of such a model has no place for it, so ``graftr merge`` refuses unless ``b`` is zero.

On a Mixture-of-Experts expert site each expert has its own ``s_e`` and ``b_e`` (:class:`ExpertScaleBias`); merging
folds them into the fused weight and bias, and is refused where the experts have no bias (Mixtral, Qwen3-MoE) and
``b`` is not zero, as above.

PEFT has no equivalent (no method adds both a bias and a scale per output feature; ``IA3`` is the scale alone), so
``graftr export --format peft`` refuses it with that reason.
"""

from __future__ import annotations


import torch
from torch import nn

from graftr.adapters.base import ExpertAdapter, LinearAdapter, expert_rows, full_shape
from graftr.adapters.config import ScaleBiasConfig
from graftr.moe import ExpertSubset, row_experts
from graftr.registry import register_adapter

PEFT_REFUSAL = ("scale_bias has no HF PEFT equivalent (PEFT has no tuner adding a bias and a scale per output "
                "feature; IA3 is the scale alone): keep the graftr adapter, or merge it with graftr merge")


@register_adapter(ScaleBiasConfig, ops=("linear", "experts"))
class ScaleBias(LinearAdapter):
    position = "output"
    is_scaling = True  # reads only the site's output, never x: an input scaling after it still merges exactly
    peft_refusal = PEFT_REFUSAL  # graftr.formats.peft.export_peft refuses with this line

    def __init__(self, out_features: int, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_site(cls, config: ScaleBiasConfig, site, *, device, experts: list[int] | None = None):
        if site.op == "experts":
            return ExpertScaleBias(site.num_experts, site.out_features, experts, device)
        return cls(site.out_features, device)

    def forward(self, x, y):
        return ((y + self.bias) * self.scale).to(y.dtype)

    def check_merge(self) -> None:
        return None

    def merge_into(self, weight, bias, layout):
        s = self.scale.float().to(weight.device)
        merged = (weight.float() * (s[:, None] if layout == "out_in" else s[None, :])).to(weight.dtype)
        new_bias = self.bias.float().to(weight.device) + (bias.float() if bias is not None else 0.0)
        dtype = bias.dtype if bias is not None else weight.dtype
        return merged, (new_bias * s).to(dtype)

    def extra_repr(self) -> str:
        return f"features={full_shape(self.scale).numel()}"


class ExpertScaleBias(ExpertAdapter, ScaleBias):
    """Scale and bias per expert: ``scale``, ``bias`` (k, out) for the k selected experts (the others 1 and 0)."""

    def __init__(self, num_experts: int, out_features: int, experts: list[int] | None = None, device=None):
        nn.Module.__init__(self)
        self.subset = ExpertSubset(num_experts, experts, device)
        k = self.subset.count
        self.scale = nn.Parameter(torch.ones(k, out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(k, out_features, dtype=torch.float32, device=device))

    def forward(self, x, y, offsets):
        rows = row_experts(offsets, y.shape[0])
        return ((y + self.subset.full(self.bias)[rows]) * self.subset.full(self.scale, fill=1.0)[rows]).to(y.dtype)

    def merge_into(self, weight, bias, layout):
        s = self.subset.full(self.scale.float(), fill=1.0).to(weight.device)  # (E, out)
        b = self.subset.full(self.bias.float()).to(weight.device)
        merged = weight.float()
        expert_rows(merged, layout).mul_(s[:, :, None])
        if bias is None:
            if b.abs().max() > 0:
                from graftr.errors import MergeError

                raise MergeError("these experts have no bias parameter, so the learned scale_bias bias cannot be "
                                 "merged into a checkpoint transformers loads; keep the adapter (graftr deploy, "
                                 "graftr generate)")
            return merged.to(weight.dtype), None
        return merged.to(weight.dtype), ((bias.float() + b) * s).to(bias.dtype)

    def extra_repr(self) -> str:
        return f"{self.subset.extra_repr()}, features={full_shape(self.scale)[-1]}"
