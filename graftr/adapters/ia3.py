"""IA³: learned scaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", https://arxiv.org/abs/2205.05638; HF PEFT ``IA3``).

One vector ``l``, initialised to ones, per targeted linear layer ``y = W x + b``:

* ``scale: output`` (attention-type sites: k_proj, v_proj, ...):  ``y = (W x + b) ⊙ l``,  ``l ∈ R^out`` (bias scaled too)
* ``scale: input`` (feed-forward sites: down_proj, fc2, wo, ...): ``y = W (x ⊙ l) + b``,  ``l ∈ R^in``

``l`` is kept in fp32 on any base dtype; the product is cast back to the activation dtype. Merging folds ``l``
into the rows (output) or columns (input) of ``W``; it is exact up to rounding.

On a Mixture-of-Experts expert site (``op: experts``) each expert has its own vector: ``l ∈ R^{E×F}``, routed row
``x`` of expert ``e`` scaled by ``l_e`` — on ``mlp.experts.down_proj`` with ``scale: input`` that is the expert's
intermediate activation, as the dense feed-forward rule (:class:`ExpertIA3`). PEFT has no IA³ on experts.

PEFT's ``IA3`` is this kind exactly (:meth:`IA3.from_peft`, :meth:`IA3.to_peft`; below the class).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from graftr.adapters.base import ExpertAdapter, LinearAdapter, expert_rows, full_shape
from graftr.errors import GraftrError
from graftr.formats import peft as fmt
from graftr.formats.graftr import load_state_into
from graftr.grafted import GraftedModel, graft
from graftr.adapters.config import IA3Config
from graftr.moe import ExpertSubset, row_experts
from graftr.registry import register_adapter


@register_adapter(IA3Config, ops=("linear", "experts"))
class IA3(LinearAdapter):
    is_scaling = True

    peft_type = "IA3"

    @classmethod
    def from_peft(cls, model, config: dict, tensors: dict, where: str):
        return _import_ia3(model, config, tensors, where)

    @classmethod
    def to_peft(cls, gm) -> tuple[dict, dict]:
        return _export_ia3(gm)

    def __init__(self, features: int, scale: str, device=None):
        super().__init__()
        self.position = scale
        self.ia3_l = nn.Parameter(torch.ones(features, dtype=torch.float32, device=device))

    @classmethod
    def from_site(cls, config: IA3Config, site, *, device, experts: list[int] | None = None):
        features = site.out_features if config.scale == "output" else site.in_features
        if site.op == "experts":
            return ExpertIA3(site.num_experts, features, config.scale, experts, device)
        return cls(features, config.scale, device)

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
        return f"{self.position}, features={full_shape(self.ia3_l).numel()}"


class ExpertIA3(ExpertAdapter, IA3):
    """IA³ per expert: ``ia3_l`` (k, F) for the k selected experts (the others keep 1)."""

    def __init__(self, num_experts: int, features: int, scale: str, experts: list[int] | None = None, device=None):
        nn.Module.__init__(self)
        self.position = scale
        self.subset = ExpertSubset(num_experts, experts, device)
        self.ia3_l = nn.Parameter(torch.ones(self.subset.count, features, dtype=torch.float32, device=device))

    def forward(self, x, *rest):
        offsets = rest[-1]
        t = x if self.position == "input" else rest[0]
        l = self.subset.full(self.ia3_l, fill=1.0)[row_experts(offsets, t.shape[0])]  # (S, F)
        return (t * l).to(t.dtype)

    def merge_into(self, weight, bias, layout):
        l = self.subset.full(self.ia3_l.float(), fill=1.0).to(weight.device)  # (E, F)
        merged = weight.float()
        rows = expert_rows(merged, layout)  # (E, out, in)
        rows.mul_(l[:, :, None] if self.position == "output" else l[:, None, :])
        if bias is not None and self.position == "output":
            bias = (bias.float() * l).to(bias.dtype)
        return merged.to(weight.dtype), bias

    def extra_repr(self) -> str:
        return f"{self.subset.extra_repr()}, {self.position}, features={full_shape(self.ia3_l)[-1]}"


# ---- IA3 (graftr kind `ia3`) -------------------------------------------------------------------------------------
# PEFT's IA3 layer (peft/tuners/ia3/layer.py) scales the output, `(W x + b) * l` with l saved as (out, 1), or, for a
# module matching `feedforward_modules`, the input, `W (x * l) + b` with l saved as (1, in); both in the vector's
# dtype cast back to the activation's, exactly graftr's `ia3` with `scale: output` / `scale: input`.
_IA3_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "target_modules", "exclude_modules",
              "feedforward_modules", "modules_to_save",
              # only how the vectors were initialised (ones, or random if False) before training
              "init_ia3_weights",
              # PEFT corrects it per module (Conv1D: True, Linear: False); the vectors are the same either way
              "fan_in_fan_out"}


def _ia3_feedforward(spec, path: str) -> bool:
    """PEFT's feedforward test (``IA3Model._check_target_module_feedforward``): a string is a regex over the whole
    path; a list entry is a plain string suffix, not whole components (``output.dense`` also hits
    ``attention.output.dense``, ``proj`` hits ``down_proj``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(t) for t in spec)


def _import_ia3(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    fmt.check_options(config, _IA3_KNOWN, {}, where)
    ff_spec = config.get("feedforward_modules")
    if ff_spec is None:
        raise GraftrError(f"{where}: feedforward_modules is not set (PEFT would fill in its default for the "
                          "architecture at load time); write it out so graftr knows which modules scale their input")
    gm, saved = fmt.prepare_for_import(model, config)
    selected = fmt.peft_targets(model, gm, config, saved, where)
    feedforward = {p for p in selected if _ia3_feedforward(ff_spec, p)}
    spec = config.get("target_modules")
    rules = []
    for name, scale, group in (("ia3", "output", selected - feedforward), ("ia3_ff", "input", feedforward)):
        if group:
            names = [t for t in spec if any(p == t or p.endswith(f".{t}") for p in group)] \
                if isinstance(spec, list) else None
            rules.append({"name": name, "match": fmt.peft_match(config, group, saved, gm, names),
                          "adapter": {"kind": "ia3", "scale": scale}})
    recipe = fmt.build_recipe(fmt.recipe_data(gm, config, where, saved, rules), where)
    gm = graft(gm, recipe, model_id=config.get("base_model_name_or_path"))
    load_state_into(gm, fmt.checked_tensors(gm, tensors, fmt.peft_keys(gm), where, _ia3_shapes(gm)), where)
    return gm


def _ia3_shapes(gm: GraftedModel) -> dict[str, tuple[int, int]]:
    """PEFT's shapes of the vectors: (out, 1) for output scaling, (1, in) for input scaling."""
    shapes = {}
    for target, module in gm.adapter_modules().items():
        n = module.ia3_l.numel()
        shapes[f"{target}.ia3_l"] = (1, n) if module.position == "input" else (n, 1)
    return shapes


def _ia3_names(paths: list[str], feedforward: set[str], names: list[str]) -> tuple:
    """``target_modules`` and ``feedforward_modules`` with which PEFT adapts exactly ``paths`` (among ``names``) and
    scales the input of exactly ``feedforward``: the fewest trailing path components that do so, with the
    feedforward entries taken from the target entries (PEFT requires a subset); else regexes of the full paths."""
    for depth in range(1, max(p.count(".") for p in paths) + 2):
        targets = list(dict.fromkeys(".".join(p.split(".")[-depth:]) for p in paths))
        if {n for n in names if fmt.peft_selects(targets, n)} != set(paths):
            continue
        ff = [t for t in targets if any(p.endswith(t) for p in feedforward)]
        if {p for p in paths if _ia3_feedforward(ff, p)} == feedforward:
            return targets, ff
    ff_regex = "|".join(re.escape(p) for p in paths if p in feedforward) or "(?!)"  # (?!) matches nothing
    return "|".join(re.escape(p) for p in paths), ff_regex


def _export_ia3(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    sites = fmt.one_adapter_per_site(gm, "IA3 vector")
    paths = [site.path for site in sites]
    saved = fmt.saved_outside(gm, paths)
    state = fmt.real_state(gm)
    shapes, keys = _ia3_shapes(gm), fmt.peft_keys(gm)
    tensors = {keys[n]: t.reshape(shapes[n]) if n in shapes else t for n, t in state.items()}
    feedforward = {site.path for plan in gm.plans for site in plan.sites if plan.rule.adapter.scale == "input"}
    targets, ff = _ia3_names(paths, feedforward, fmt.modules_outside(gm, saved))
    config = {
        "auto_mapping": None, "base_model_name_or_path": gm.model_id, "exclude_modules": None,
        "fan_in_fan_out": any(site.layout == "in_out" for site in sites), "feedforward_modules": ff,
        "inference_mode": True, "init_ia3_weights": True, "modules_to_save": saved or None, "peft_type": "IA3",
        "revision": None, "target_modules": targets, "task_type": fmt.TASK_TYPES.get(gm.task),
    }
    return config, tensors
