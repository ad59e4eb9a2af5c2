"""The two passes: **match** (annotate) and **rewrite** (transform).

``match`` only tags nodes: it records in ``node.meta["graftr_matched"]`` of each site's anchor node the rules that
selected it, and returns the plan. A dry run is this step alone. ``rewrite`` then walks the rules in recipe order,
builds each adapter from its site, installs it as a submodule at ``<site path>.<rule name>`` (so its parameter
names contain the site's module path) and inserts its nodes, tagging each with ``node.meta["graftr_rule"]``.
The graph is linted after every rule; a failure names the rule.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import fx

from graftr import fxmeta
from graftr.errors import GraftrError, MatchError
from graftr.registry import get_kind
from graftr.sites import SiteIndex
from graftr.trace import install_module


@dataclass
class RulePlan:
    rule: object  # graftr.recipe.Rule
    sites: list
    params_added: int = 0
    targets: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.rule.name


def _closest(rule, sites) -> str:
    patterns = rule.match.path or [rule.match.describe()]
    paths = sorted({s.path for s in sites})
    close: list[str] = []
    for p in patterns:
        probe = p.replace("**", "*").replace("*", "0").replace("{", "").replace("}", "").split(",")[0]
        close += [c for c in difflib.get_close_matches(probe, paths, n=5, cutoff=0.3) if c not in close]
    return ", ".join(close[:5]) or ", ".join(paths[:5]) or "(the model has no such sites)"


def match(index: SiteIndex, recipe) -> list[RulePlan]:
    """Annotate: tag every site each rule selects. Raises :class:`MatchError` for a rule matching nothing."""
    plans = []
    for rule in recipe.rules:
        kind = get_kind(rule.adapter.kind)
        if rule.match.op is not None and rule.match.op not in kind.ops:
            raise MatchError(f"rule {rule.name!r}: adapter kind {kind.name!r} attaches to {'/'.join(kind.ops)} "
                             f"sites, but the rule selects op: {rule.match.op}")
        pool = index.of_ops(kind.ops)
        selected = [s for s in pool if rule.match.accepts(s, index.stack_sizes)]
        if not selected:
            other = [s for s in index.all() if s not in pool and rule.match.accepts(s, index.stack_sizes)]
            hint = (f"; it would select {len(other)} {other[0].op} site(s), which {kind.name!r} cannot attach to"
                    if other else f"; closest module paths: {_closest(rule, pool)}")
            raise MatchError(f"rule {rule.name!r} matched nothing ({rule.match.describe()}){hint}")
        for site in selected:
            site.anchor.meta.setdefault(fxmeta.MATCHED, []).append(rule.name)
        plans.append(RulePlan(rule, selected))
    return plans


def _device_for(gm: fx.GraphModule, site) -> torch.device:
    """Adapters live beside the site's weights; on a meta base they get real CPU tensors (so they can be saved)."""
    weight = site.weight if site.op == "linear" else next(iter(site.projections.values())).weight
    device = gm.get_parameter(weight).device
    return torch.device("cpu") if device.type == "meta" else device


def rewrite(gm: fx.GraphModule, plans: list[RulePlan]) -> list[RulePlan]:
    """Transform: insert every planned adapter, rule by rule, linting after each."""
    for plan in plans:
        kind = get_kind(plan.rule.adapter.kind)
        before = set(gm.graph.nodes)
        for site in plan.sites:
            module = kind.module_cls.from_site(plan.rule.adapter, site, device=_device_for(gm, site))
            target = install_module(gm, f"{site.path}.{plan.rule.name}", module)
            module.graft(gm.graph, site, target)
            site.adapters.append(target)
            plan.targets.append(target)
            plan.params_added += sum(p.numel() for p in module.parameters())
        for node in gm.graph.nodes:
            if node not in before:
                node.meta[fxmeta.RULE] = plan.rule.name
        try:
            gm.graph.lint()
        except Exception as e:  # lint raises RuntimeError/AssertionError with a description of the bad node
            raise GraftrError(f"rewrite pass for rule {plan.rule.name!r} produced an invalid graph: {e}") from e
    gm.recompile()
    return plans
