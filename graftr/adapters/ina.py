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

On a Mixture-of-Experts expert site (``op: experts``) every expert ``e`` has its own ``A_e``, ``B_e`` and each routed
token ``x`` (sorted by expert, :mod:`graftr.moe`) goes through its expert's: ``y += s · B_e f(A_e x − Th)``, two
grouped products on the routing offsets the base product uses (no E × out × in delta is ever built), ``Th`` per
token as above (:class:`ExpertInA`; PEFT's ``target_parameters`` layout in and out).

The adapter computes in its own dtype (``dtype``, fp32 by default) and casts the result back to the activation
dtype. Merging is exact only for p = 0 (LoRA's ``W0 + s·B·A``); for p > 0 it is refused, because the per-token
threshold and the activation cannot be folded into a weight (the official code silently merges ``s·B·A`` anyway).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from graftr.adapters.base import ExpertAdapter, LinearAdapter, expert_rows, full_shape
from graftr.adapters.config import InAConfig
from graftr.formats import peft as fmt
from graftr.formats.graftr import load_state_into
from graftr.grafted import GraftedModel, graft
from graftr.errors import GraftrError, MergeError
from graftr.names import torch_dtype
from graftr.moe import ExpertSubset, grouped_mm
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


@register_adapter(InAConfig, ops=("linear", "experts"))
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
    def from_site(cls, config: InAConfig, site, *, device, experts: list[int] | None = None):
        if site.op == "experts":
            return ExpertInA(site.num_experts, site.in_features, site.out_features, config, experts, device)
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


class ExpertInA(ExpertAdapter, InA):
    """InA/LoRA per expert: ``lora_A`` (k, r, in), ``lora_B`` (k, out, r) for the k selected experts."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, config: InAConfig,
                 experts: list[int] | None = None, device=None):
        nn.Module.__init__(self)
        dtype = torch_dtype(config.dtype)
        self.rank, self.inhibition, self.activation = config.rank, config.inhibition, config.activation
        self.scaling = config.alpha / config.rank
        self.subset = ExpertSubset(num_experts, experts, device)
        k = self.subset.count
        self.lora_A = nn.Parameter(torch.empty(k, config.rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(k, out_features, config.rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout)
        for a in self.lora_A:  # as nn.Linear's (r, in) per expert
            if config.init == "lora":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=1 / config.rank)

    def forward(self, x, y, offsets):
        z = grouped_mm(self.dropout(x.to(self.lora_A.dtype)), self.subset.full(self.lora_A).transpose(1, 2), offsets)
        if self.inhibition > 0:
            threshold = self.inhibition * z.max(dim=-1, keepdim=True).values
            z = ACTIVATIONS[self.activation](z - threshold)
        b = self.subset.full(self.lora_B * self.scaling).transpose(1, 2)  # (E, r, out), s folded in as above
        return (y + grouped_mm(z, b, offsets)).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The (E, out, in) weight change ``s · B_e A_e`` (zero for experts without parameters)."""
        return self.scaling * self.subset.full(self.lora_B.float() @ self.lora_A.float())

    def merge_into(self, weight, bias, layout):
        self.check_merge()
        merged = weight.float()
        expert_rows(merged, layout).add_(self.delta().to(weight.device))
        return merged.to(weight.dtype), bias

    def extra_repr(self) -> str:
        k, r, i = full_shape(self.lora_A)
        return (f"{self.subset.extra_repr()}, in={i}, out={full_shape(self.lora_B)[1]}, rank={r}, "
                f"scaling={self.scaling:g}, inhibition={self.inhibition}")


# ---- LoRA (graftr kind `ina`) ------------------------------------------------------------------------------------
# adapter_config.json fields import reads, or ignores because they do not change the model
_LORA_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
               "lora_inhibition", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "megatron_core", "target_parameters",
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
    "trainable_token_indices": "trainable embedding rows",
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
    rules = []
    if config.get("target_modules") or not config.get("target_parameters"):
        selected = fmt.peft_targets(model, gm, config, saved, where)
        rules.append({"name": "ina", "match": fmt.peft_match(config, selected, saved, gm),
                      "adapter": _lora_adapter(config)})
    experts = _peft_expert_sites(gm, config.get("target_parameters") or [], where)
    if experts:
        rules.append({"name": "ina_experts", "match": {"op": "experts", "path": [s.path for s in experts]},
                      "adapter": _lora_adapter(config)})
    recipe = fmt.build_recipe(fmt.recipe_data(gm, config, where, saved, rules), where)
    gm = graft(gm, recipe, model_id=config.get("base_model_name_or_path"))
    keys, shapes = _lora_keys(gm)
    loaded = fmt.checked_tensors(gm, tensors, keys, where, shapes)
    for name, key in keys.items():  # PEFT's expert layout → graftr's (E, r, in) and (E, out, r)
        if name in shapes:
            loaded[name] = _from_peft_expert(name, tensors[key], gm.get_parameter(name).shape[0])
    load_state_into(gm, loaded, where)
    return gm


# ---- LoRA on Mixture-of-Experts expert parameters: PEFT's `target_parameters` (lora.ParamWrapper) ----------------
# PEFT wraps the experts module once per targeted parameter, the first parameter (in the module's registration order)
# innermost: its tensors are `<module>.base_layer.lora_A.weight`, the next one's `<module>.lora_A.weight`.
# lora_A.weight is (E·r, in), read as (E, r, in) — expert-major; lora_B.weight is (out, r·E), read as (out, r, E) —
# rank-major; ΔW_e = scaling · B[:, :, e] @ A[e]. PEFT refuses lora_dropout there.


def _peft_expert_sites(gm: GraftedModel, targets: list[str], where: str) -> list:
    """The expert sites PEFT's ``target_parameters`` select (a parameter name equal to or ending in ``.<target>``);
    a targeted parameter that is no expert site is refused by name."""
    if not targets:
        return []
    hit = lambda name: any(name == t or name.endswith(f".{t}") for t in targets)  # noqa: E731
    sites = [s for s in gm.site_index.experts if hit(s.path)]
    others = [n for n, _ in gm.named_parameters() if hit(n) and n not in {s.path for s in sites}]
    if others:
        raise GraftrError(f"{where}: target_parameters select {others[0]}, which is not a fused expert projection "
                          "graftr adapts (LoRA on other raw parameters is not supported)")
    if not sites:
        raise GraftrError(f"{where}: target_parameters {json.dumps(targets)} match no expert parameter of "
                          f"{gm.hf_class}")
    return sites


def _expert_depths(gm: GraftedModel, sites: list) -> dict[str, int]:
    """How many ``base_layer`` wrappers PEFT puts between an experts module and each targeted parameter's tensors."""
    order = {n: i for i, (n, _) in enumerate(gm.named_parameters())}
    by_module: dict[str, list] = {}
    for site in sites:
        by_module.setdefault(site.path.rsplit(".", 1)[0], []).append(site.path)
    depths = {}
    for paths in by_module.values():
        paths.sort(key=order.__getitem__)
        depths.update({p: len(paths) - 1 - i for i, p in enumerate(paths)})
    return depths


def _lora_keys(gm: GraftedModel) -> tuple[dict[str, str], dict[str, tuple]]:
    """graftr parameter → PEFT key, and PEFT's shape of each expert tensor."""
    keys = fmt.peft_keys(gm, ".weight")
    sites = [(site, target) for plan in gm.plans for site, target in zip(plan.sites, plan.targets)
             if site.op == "experts"]
    depths = _expert_depths(gm, [s for s, _ in sites])
    shapes = {}
    for site, target in sites:
        module = site.path.rsplit(".", 1)[0] + ".base_layer" * depths[site.path]
        adapter = gm.get_submodule(target)
        e, r = site.num_experts, adapter.rank
        for param, shape in (("lora_A", (e * r, site.in_features)), ("lora_B", (site.out_features, r * e))):
            keys[f"{target}.{param}"] = f"{fmt.PREFIX}{module}.{param}.weight"
            shapes[f"{target}.{param}"] = shape
    return keys, shapes


def _from_peft_expert(name: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """PEFT's (E·r, in) → (E, r, in); (out, r·E) → (E, out, r)."""
    if name.endswith("lora_A"):
        return tensor.reshape(experts, -1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1, experts).permute(2, 0, 1).contiguous()


def _to_peft_expert(adapter: "ExpertInA") -> tuple[torch.Tensor, torch.Tensor]:
    """(E·r, in) and (out, r·E) from the adapter's tensors, every expert included (zeros where it has none)."""
    a = adapter.subset.full(adapter.lora_A.detach())  # (E, r, in)
    b = adapter.subset.full(adapter.lora_B.detach())  # (E, out, r)
    return a.flatten(0, 1).contiguous(), b.permute(1, 2, 0).flatten(1).contiguous()


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
    experts = [s for s in sites if s.op == "experts"]
    sites = [s for s in sites if s.op != "experts"]
    if experts and cfg.dropout > 0:
        raise GraftrError(f"PEFT's LoRA on expert parameters (target_parameters) has no dropout, and this adapter "
                          f"was trained with dropout {cfg.dropout}; it cannot be exported to PEFT")
    paths = [site.path for site in sites]
    saved = fmt.saved_outside(gm, paths + [s.path for s in experts])
    state = fmt.real_state(gm)
    keys, shapes = _lora_keys(gm)
    tensors = {keys[n]: t for n, t in state.items() if n not in shapes}
    for plan in gm.plans:
        for site, target in zip(plan.sites, plan.targets):
            if site.op == "experts":
                a, b = _to_peft_expert(gm.get_submodule(target))
                tensors[keys[f"{target}.lora_A"]], tensors[keys[f"{target}.lora_B"]] = a, b
    names = fmt.modules_outside(gm, saved)
    short = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    targets = short if {n for n in names if fmt.peft_selects(short, n)} == set(paths) else paths
    params = [n for n, _ in gm.named_parameters()]
    short = list(dict.fromkeys(".".join(s.path.split(".")[-3:]) for s in experts))  # mlp.experts.down_proj
    selects = {n for n in params if any(n == t or n.endswith(f".{t}") for t in short)}
    parameters = short if selects == {s.path for s in experts} else [s.path for s in experts]
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
    if experts:
        config["target_parameters"] = parameters
    return config, tensors
