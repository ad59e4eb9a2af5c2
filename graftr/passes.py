"""The recipe's two passes: **match** (annotate) and **rewrite** (transform), in the protocol of
:mod:`graftr.passbase`.

:class:`MatchPass` only tags nodes: it records in ``node.meta["graftr_matched"]`` of each site's anchor node the
rules that selected it. A dry run is this step alone (:func:`match` also returns the plan it tagged).
:class:`RewritePass` reads the tags back (:func:`planned`), then walks the rules in recipe order, builds each
adapter from its site, installs it as a submodule at ``<site path>.<rule name>`` (so its parameter
names contain the site's module path; ``<rule name>@<adapter>`` for a named adapter, :mod:`graftr.named`) and
inserts its nodes, tagging each with ``node.meta["graftr_rule"]``.
The graph is linted after every rule; a failure names the rule.

**Rule-level shared modules.** An adapter class may define ``shared_for_rule(config, sites, *, stack_size,
device)`` (see :meth:`graftr.adapters.base.Adapter.shared_for_rule`) returning parameters that all the rule's
sites use, such as the hypernetwork producing every layer's prompt. ``rewrite`` calls it once per layer stack the
rule's sites are in, installs the module at ``<stack prefix>.<rule name>`` (``model.layers.llama_adapter_nl``;
``<rule name>`` for sites outside any stack), records the path in ``RulePlan.shared`` and passes it to
``from_site(..., shared=<path>)``. The per-site modules reach it through their own graph nodes (``call_module``),
never as a child module, so its parameters appear once in ``named_parameters()`` and the state dict.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import fx

from graftr import fxmeta
from graftr.errors import GraftrError, LayerCountError, MatchError
from graftr.named import DEFAULT, qualified
from graftr.passbase import GraphPass, PassResult
from graftr.registry import kind_of
from graftr.sites import SiteIndex, stack_sizes
from graftr.trace import install_module


@dataclass
class RulePlan:
    rule: object  # graftr.recipe.Rule
    sites: list
    params_added: int = 0
    targets: list[str] = field(default_factory=list)  # the per-site adapter modules, one per site, in site order
    shared: list[str] = field(default_factory=list)  # the rule's shared modules (one per layer stack), if any

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def modules(self) -> list[str]:
        """Every module the rule installed: its shared modules, then the per-site ones."""
        return [*self.shared, *self.targets]


def _closest(rule, sites) -> str:
    patterns = rule.match.path or [rule.match.describe()]
    paths = sorted({s.path for s in sites})
    close: list[str] = []
    for p in patterns:
        probe = p.replace("**", "*").replace("*", "0").replace("{", "").replace("}", "").split(",")[0]
        close += [c for c in difflib.get_close_matches(probe, paths, n=5, cutoff=0.3) if c not in close]
    return ", ".join(close[:5]) or ", ".join(paths[:5]) or "(the model has no such sites)"


def _layers_problem(rule, recipe, error: MatchError) -> str:
    """The message for a ``layers`` selection the model is too shallow for: the rule, its line, the relative form.

    A fixed count (``last: 30``, Llama-2-7B's setting) written for the recipe's own model gets the ``last_fraction``
    of that model's depth (read from its config, which graftr bundles for the common models) as the fix.
    """
    where = f"{rule._origin}: " if rule._origin else ""
    layers = rule.match.layers
    fix = "write layers: {last_fraction: F} to take the last share F of the layers on any depth"
    count = layers.last or layers.first
    if layers.last is not None and recipe.model:
        try:
            from graftr.models import resolve

            config = resolve(recipe.model).config
            depth = getattr(config.get_text_config(), "num_hidden_layers", None)
        except Exception:  # the recipe's model is not available here: offer the form without a value
            depth = None
        if depth and count <= depth:
            fix = (f"write layers: {{last_fraction: {count / depth:g}}} to take the same share ({count} of the {depth} "
                   f"layers of {recipe.model}, the recipe's model) on any depth")
    return f"{where}rule {rule.name!r}: {error}; {fix}"


def match(index: SiteIndex, recipe) -> list[RulePlan]:
    """Annotate: tag every site each rule selects (tags of an earlier match are dropped first) and return the plan.
    Raises :class:`MatchError` for a rule matching nothing."""
    for site in index.all():
        fxmeta.untag_matched(site.anchor)
    plans = []
    for rule in recipe.rules:
        kind = kind_of(rule.adapter)
        if rule.match.op is not None and rule.match.op not in kind.ops:
            raise MatchError(f"rule {rule.name!r}: adapter kind {kind.name!r} attaches to {'/'.join(kind.ops)} "
                             f"sites, but the rule selects op: {rule.match.op}")
        pool = index.of_ops(kind.ops)
        try:
            selected = [s for s in pool if rule.match.accepts(s, index.stack_sizes)]
        except LayerCountError as e:
            raise MatchError(_layers_problem(rule, recipe, e)) from None
        except MatchError as e:  # match.experts asks for more experts than a site has
            raise MatchError(f"{rule._origin + ': ' if rule._origin else ''}rule {rule.name!r}: {e}") from None
        if not selected:
            other = [s for s in index.all() if s not in pool and rule.match.accepts(s, index.stack_sizes)]
            hint = (f"; it would select {len(other)} {other[0].op} site(s), which {kind.name!r} cannot attach to"
                    if other else f"; closest module paths: {_closest(rule, pool)}")
            raise MatchError(f"rule {rule.name!r} matched nothing ({rule.match.describe()}){hint}")
        for site in selected:
            fxmeta.tag_matched(site.anchor, rule.name)
        plans.append(RulePlan(rule, selected))
    return plans


def planned(index: SiteIndex, recipe) -> list[RulePlan]:
    """The plan :func:`match` annotated, read back from the graph: per rule, the sites whose anchor it tagged."""
    plans = []
    for rule in recipe.rules:
        sites = [s for s in index.of_ops(kind_of(rule.adapter).ops) if rule.name in fxmeta.matched(s.anchor)]
        plans.append(RulePlan(rule, sites))
    return plans


class MatchPass(GraphPass):
    """Annotate: tag the sites every rule of ``recipe`` selects (the graph's code does not change)."""

    name = "match"

    def __init__(self, recipe):
        self.recipe = recipe

    def call(self, gm) -> PassResult:
        match(gm.site_index, self.recipe)
        return PassResult(gm, False)


class RewritePass(GraphPass):
    """Transform: insert the adapters of ``recipe`` at the sites :class:`MatchPass` tagged; ``plans`` holds what was
    inserted, rule by rule. ``adapter`` names the adapter they belong to (:mod:`graftr.named`: a name other than
    ``"default"`` installs them at ``<site path>.<rule>@<adapter>``)."""

    name = "rewrite"

    def __init__(self, recipe, adapter: str = DEFAULT):
        self.recipe, self.adapter = recipe, adapter
        self.plans: list[RulePlan] = []

    def requires(self, gm) -> None:
        untagged = [p.name for p in planned(gm.site_index, self.recipe) if not p.sites]
        if untagged:
            raise RuntimeError(f"rewrite needs the match pass first: no site is tagged for rules {untagged}")

    def call(self, gm) -> PassResult:
        self.plans = rewrite(gm, planned(gm.site_index, self.recipe), adapter=self.adapter)
        return PassResult(gm, True)


def _device_for(gm: fx.GraphModule, site) -> torch.device:
    """Adapters live beside the site's weights; on a meta base they get real CPU tensors (so they can be saved)."""
    weight = site.weight if site.op != "attention" else next(iter(site.projections.values())).weight
    owner, _, local = weight.rpartition(".")
    device = gm.get_submodule(owner)._parameters.get(local, gm.get_submodule(owner)._buffers.get(local)).device
    return torch.device("cpu") if device.type == "meta" else device


MIN_SIZE_LIMIT = 2**24  # adapters may always hold this many parameters, however small the model


def _by_stack(sites: list) -> dict[str | None, list]:
    by_stack: dict[str | None, list] = {}
    for site in sites:
        by_stack.setdefault(site.layer[0] if site.layer else None, []).append(site)
    return by_stack


def _expert_selection(rule, site) -> dict:
    """``{"experts": [...]}`` for a rule that selects some experts of an expert site (``match.experts``), else {}."""
    if site.op != "experts" or rule.match.experts is None:
        return {}
    return {"experts": sorted(rule.match.experts.resolve(site.num_experts))}


def _refuse_oversized(gm: fx.GraphModule, plans: list[RulePlan], sizes: dict[str, int]) -> None:
    """Build every planned adapter on the ``meta`` device first (no memory, no random draws) and refuse the plan if
    they would hold more parameters than the model they adapt. The memory and time a rewrite takes are then bounded
    by the model's size, whatever a recipe sets a rank or a prompt length to (a validated ``rank`` of 10^9 would
    otherwise allocate terabytes before anything could say so)."""
    meta = torch.device("meta")
    base = sum(p.numel() for p in gm.parameters())
    limit = max(base, MIN_SIZE_LIMIT)
    added = 0
    for plan in plans:
        kind = kind_of(plan.rule.adapter)
        rule_added = 0
        for stack, sites in _by_stack(plan.sites).items():
            shared = kind.module_cls.shared_for_rule(plan.rule.adapter, sites, stack_size=sizes.get(stack),
                                                     device=meta)
            extra = {}
            if shared is not None:
                rule_added += sum(p.numel() for p in shared.parameters())
                extra = {"shared": f"{stack}.{plan.rule.name}" if stack else plan.rule.name}
            for site in sites:
                module = kind.module_cls.from_site(plan.rule.adapter, site, device=meta, **extra,
                                                   **_expert_selection(plan.rule, site))
                rule_added += sum(p.numel() for p in module.parameters())
        added += rule_added
        if added > limit:
            options = ", ".join(f"{k} {v}" for k, v in plan.rule.adapter.model_dump(exclude={"kind"}).items()
                                if isinstance(v, int) and not isinstance(v, bool))
            raise GraftrError(f"rule {plan.rule.name!r} ({kind.name}{': ' + options if options else ''}) would add "
                              f"{rule_added:,} parameters on {len(plan.sites)} sites, {added:,} with the rules before "
                              f"it: more than the model it adapts holds ({base:,}; at least {MIN_SIZE_LIMIT:,} are allowed); choose a "
                              "smaller size")


def _install_shared(gm: fx.GraphModule, plan: RulePlan, kind, sizes: dict[str, int],
                    name: str) -> dict[str | None, str]:
    """Build and install the rule's shared module for each layer stack its sites are in, named ``name``:
    {stack prefix: path}."""
    installed = {}
    for stack, sites in _by_stack(plan.sites).items():
        module = kind.module_cls.shared_for_rule(plan.rule.adapter, sites, stack_size=sizes.get(stack),
                                                 device=_device_for(gm, sites[0]))
        if module is None:
            continue
        target = install_module(gm, f"{stack}.{name}" if stack else name, module)
        installed[stack] = target
        plan.shared.append(target)
        plan.params_added += sum(p.numel() for p in module.parameters())
    return installed


def rewrite(gm: fx.GraphModule, plans: list[RulePlan], *, adapter: str = DEFAULT) -> list[RulePlan]:
    """Transform: insert every planned adapter, rule by rule, linting after each; the modules of ``adapter`` (a
    named adapter) at ``<site path>.<rule>@<adapter>`` (:func:`graftr.named.qualified`)."""
    sizes = stack_sizes(n for n, _ in gm.named_parameters())
    _refuse_oversized(gm, plans, sizes)
    for plan in plans:
        kind = kind_of(plan.rule.adapter)
        name = qualified(plan.rule.name, adapter)
        before = set(gm.graph.nodes)
        shared = _install_shared(gm, plan, kind, sizes, name)
        for site in plan.sites:
            stack = site.layer[0] if site.layer else None
            extra = {"shared": shared[stack]} if stack in shared else {}
            module = kind.module_cls.from_site(plan.rule.adapter, site, device=_device_for(gm, site), **extra,
                                               **_expert_selection(plan.rule, site))
            target = install_module(gm, site.adapter_path(name), module)
            module.graft(gm.graph, site, target)
            site.adapters.append(target)
            plan.targets.append(target)
            plan.params_added += sum(p.numel() for p in module.parameters())
        for node in gm.graph.nodes:
            if node not in before:
                fxmeta.tag_rule(node, name)
        try:
            gm.graph.lint()
        except Exception as e:  # lint raises RuntimeError/AssertionError describing the bad node (and dumping the graph)
            problem = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise GraftrError(f"rewrite pass for rule {plan.rule.name!r} ({plan.rule.adapter.kind}) produced an invalid "
                              f"graph: {problem}") from e
    gm.recompile()
    return plans
