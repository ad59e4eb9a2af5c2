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

import torch
import torch.nn.functional as F
from torch import nn

from graftr.adapters.base import LinearAdapter, full_shape
from graftr.adapters.config import InAConfig
from graftr.formats import peft as fmt
from graftr.formats.graftr import load_state_into
from graftr.grafted import GraftedModel, graft
from graftr.errors import GraftrError, MergeError
from graftr.names import torch_dtype
from graftr.registry import register_adapter

ACTIVATIONS = {
    "leaky_relu": lambda t: F.leaky_relu(t, negative_slope=0.01),  # the official code
    "gelu": F.gelu,  # the paper text (exact, erf-based GeLU)
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def _merge_refusal(inhibition: float) -> str | None:
    if inhibition == 0:
        return None
    return (f"ina with inhibition {inhibition} cannot be merged: its per-token threshold p·max(A x) and the "
            "activation depend on the input and cannot be folded into a weight (the official code silently merges "
            "s·B·A, which is a different model); only inhibition 0 (plain LoRA) merges")


@register_adapter(InAConfig, ops=("linear",))
class InA(LinearAdapter):
    position = "output"

    peft_type = "LORA"

    @classmethod
    def from_peft(cls, model, config: dict, tensors: dict, where: str):
        return _import_lora(model, config, tensors, where)

    @classmethod
    def to_peft(cls, gm) -> tuple[dict, dict]:
        return _export_lora(gm)

    @classmethod
    def peft_adapters(cls, config: dict) -> list[dict]:
        return [_lora_adapter(config)]

    def __init__(self, in_features: int, out_features: int, config: InAConfig, device=None):
        super().__init__()
        dtype = torch_dtype(config.dtype)
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
        return (f"in={full_shape(self.lora_A)[1]}, out={full_shape(self.lora_B)[0]}, rank={self.rank}, scaling={self.scaling:g}, "
                f"inhibition={self.inhibition}, activation={self.activation if self.inhibition > 0 else 'none'}")


# ---- LoRA (graftr kind `ina`) ------------------------------------------------------------------------------------
# adapter_config.json fields import reads, or ignores because they do not change the model
_LORA_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
               "lora_inhibition", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "megatron_core",
               # the site knows its weight layout; lora_A/lora_B have the same shapes either way
               "fan_in_fan_out",
               # these only choose how the adapter was initialised or tied before training
               "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
               "qalora_group_size", "ensure_weight_tying", "runtime_config"}
# options that change the model: refused unless off (None/False/empty/"none"); unknown fields are treated alike
_LORA_REFUSED = {
    "use_dora": "DoRA (a magnitude vector per module)", "use_rslora": "rsLoRA scaling alpha/sqrt(r)",
    "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas", "bias": "trained base biases",
    "lora_bias": "a bias on lora_B", "layer_replication": "replicated layers", "megatron_config": "Megatron layers",
    "trainable_token_indices": "trainable embedding rows", "target_parameters": "LoRA on raw parameters",
    "use_qalora": "QALoRA", "alora_invocation_tokens": "activated LoRA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


def _lora_adapter(config: dict) -> dict:
    inhibition = config.get("lora_inhibition")
    return {"kind": "ina", "rank": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0), "inhibition": 0.0 if inhibition is None else inhibition}


def _import_lora(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    fmt.check_options(config, _LORA_KNOWN, _LORA_REFUSED, where)
    gm, saved = fmt.prepare_for_import(model, config)
    selected = fmt.peft_targets(model, gm, config, saved, where)
    rules = [{"name": "ina", "match": fmt.peft_match(config, selected, saved, gm), "adapter": _lora_adapter(config)}]
    recipe = fmt.build_recipe(fmt.recipe_data(gm, config, where, saved, rules), where)
    gm = graft(gm, recipe, model_id=config.get("base_model_name_or_path"))
    load_state_into(gm, fmt.checked_tensors(gm, tensors, fmt.peft_keys(gm, ".weight"), where), where)
    return gm


def _export_lora(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    configs = {plan.rule.adapter for plan in gm.plans}
    if len(configs) != 1:
        rules = ", ".join(f"{p.name}: {p.rule.adapter.model_dump(exclude={'kind'})}" for p in gm.plans)
        raise GraftrError(f"a PEFT LoRA adapter has one config for all modules; these rules differ ({rules})")
    cfg = configs.pop()
    if cfg.inhibition > 0 and cfg.activation != "leaky_relu":
        raise GraftrError(f"the published InA format has no activation field and its code always applies "
                          f"leaky_relu; an adapter trained with activation {cfg.activation!r} cannot be exported")
    sites = fmt.one_adapter_per_site(gm, "LoRA")
    paths = [site.path for site in sites]
    saved = fmt.saved_outside(gm, paths)
    state = fmt.real_state(gm)
    keys = fmt.peft_keys(gm, ".weight")
    tensors = {keys[n]: t for n, t in state.items()}
    names = fmt.modules_outside(gm, saved)
    short = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    targets = short if {n for n in names if fmt.peft_selects(short, n)} == set(paths) else paths
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": gm.model_id, "bias": "none",
        "fan_in_fan_out": any(site.layout == "in_out" for site in sites), "inference_mode": True,
        "init_lora_weights": True if cfg.init == "lora" else "gaussian", "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout, "lora_inhibition": cfg.inhibition, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": saved or None, "peft_type": "LORA", "r": cfg.rank,
        "rank_pattern": {}, "revision": None, "target_modules": targets, "task_type": fmt.TASK_TYPES.get(gm.task),
        "use_dora": False, "use_rslora": False,
    }
    return config, tensors
