"""Named adapters: several adapters in one grafted graph, switched on and off without re-tracing (PEFT's named
adapters: ``load_adapter(path, adapter_name)``, ``set_adapter``, ``active_adapters``, ``delete_adapter``,
``disable_adapter()``; the methods are on :class:`graftr.grafted.GraftedModel`).

Names
    The adapter :func:`graftr.graft` inserts is ``"default"`` and keeps graftr's parameter names,
    ``<site path>.<rule>.<param>``. An adapter added under another name ``n`` installs each of its modules at
    ``<site path>.<rule>@n`` (a rule's shared module at ``<stack prefix>.<rule>@n``): rule names are identifiers and
    adapter names hold no ``@`` or ``.``, so two adapters never collide and :func:`plain_name` recovers the name an
    adapter's tensors have when it is saved on its own (an ordinary graftr adapter directory, loadable alone).
Activity
    Every adapter's nodes stay in the graph. The active adapters compute; the module of an inactive one returns its
    site's value unchanged (:meth:`graftr.adapters.base.Adapter.passthrough`: the output an output adapter received,
    the input an input adapter received), so its site is exactly as if it were absent and ``disable_adapter()``
    gives the base model's outputs bit for bit. Switching sets a flag on each adapter module: no re-trace, no
    recompile (a ``torch.compile``-d graph recompiles once per combination, on its guards).
    :meth:`~graftr.grafted.GraftedModel.set_adapter` also makes exactly the active adapters trainable, as PEFT does.
Composition
    Adapters apply in the order they were added, as a recipe's rules do: a later adapter's module reads what the
    earlier ones left at the site, which is the site's own value while those are off. One adapter active alone thus
    computes what it computes loaded alone.
What cannot coexist
    is refused when an adapter is added (:func:`check_addition`): adapters that change the base itself (a recipe's
    ``trainable_modules``, trained in place; a ``vision:`` section's image input) hold the model alone, and every
    adapter must have been trained on the base this model computes with (the same ``quantize:`` section).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from graftr import fxmeta
from graftr.errors import GraftrError

DEFAULT = "default"
SEPARATOR = "@"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")  # as a recipe's name: no '.', no '@', no '/'
_SITE_NODES = ("input", "output", "query", "key", "value", "mask", "scores")  # a site's current nodes


@dataclass
class NamedAdapter:
    """One adapter of a grafted model: its recipe, what the rewrite pass inserted for it, the parameters it owns."""

    name: str
    recipe: object  # graftr.recipe.Recipe
    plans: list = field(default_factory=list)  # graftr.passes.RulePlan per rule, in recipe order
    params: list[str] = field(default_factory=list)  # the model's names of its tensors (modules, trainable_modules)

    @property
    def modules(self) -> list[str]:
        """Every module it installed: each rule's shared modules, then the per-site ones."""
        return [t for plan in self.plans for t in plan.modules]

    @property
    def targets(self) -> list[str]:
        """Its per-site modules (the ones with a node at a site)."""
        return [t for plan in self.plans for t in plan.targets]

    @property
    def changes_base(self) -> str | None:
        """What of the base model this adapter changes in place (then it cannot be switched off), else None."""
        if self.recipe.trainable_modules:
            return f"trains base modules in place (trainable_modules: {', '.join(self.recipe.trainable_modules)})"
        if getattr(self.recipe, "vision", None) is not None:
            return "adds an image input to the graph (vision:)"
        return None


def qualified(rule: str, adapter: str) -> str:
    """The attribute name of ``rule``'s modules for ``adapter``: the rule's name for the default adapter."""
    return rule if adapter == DEFAULT else f"{rule}{SEPARATOR}{adapter}"


def plain_name(name: str, adapter: str) -> str:
    """``name`` (a module or parameter name of ``adapter``) as the adapter saved alone has it."""
    if adapter == DEFAULT:
        return name
    suffix = SEPARATOR + adapter
    return ".".join(part.removesuffix(suffix) for part in name.split("."))


def check_name(gm, name) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise GraftrError(f"adapter name {name!r}: use letters, digits, _ and - (no '.', '@' or '/')")
    if name in gm.grafting.adapters:
        raise GraftrError(f"the model already has an adapter named {name!r}; delete it first or choose another name")


def check_addition(gm, recipe, name: str) -> None:
    """Refuse, before the graph changes, an adapter that cannot join the model's adapters (see the module doc)."""
    from graftr.quantize import active

    check_name(gm, name)
    if gm.graftr_outlined:
        raise GraftrError(f"cannot add adapter {name!r}: the layers are outlined (activation checkpointing); add "
                          "adapters before enabling it, or call gradient_checkpointing_disable() first")
    base_quantize, quantize = gm.grafting.quantize, getattr(recipe, "quantize", None)
    if base_quantize is not None and quantize != base_quantize:
        raise GraftrError(f"adapter {name!r} was not made on this model's quantized base ({base_quantize.method}); "
                          "an adapter must have been trained on the base the model computes with")
    if not gm.grafting.adapters:
        return
    if base_quantize is None and active(quantize):
        raise GraftrError(f"adapter {name!r} quantizes the base ({quantize.method}), which this model's adapters "
                          "were trained on dense; load it onto its own model")
    if recipe.task is not None and recipe.task != gm.task:
        raise GraftrError(f"adapter {name!r} is for a {recipe.task} model; this one is {gm.task}")
    alone = [(a.name, a.changes_base) for a in gm.grafting.adapters.values() if a.changes_base]
    if alone:
        raise GraftrError(f"adapter {alone[0][0]!r} {alone[0][1]}, so it cannot share the model with another adapter")
    probe = NamedAdapter(name, recipe)
    if probe.changes_base:
        raise GraftrError(f"adapter {name!r} {probe.changes_base}, so it cannot share the model with other adapters")


def named(gm, name: str) -> NamedAdapter:
    found = gm.grafting.adapters.get(name)
    if found is None:
        have = ", ".join(gm.grafting.adapters) or "none"
        raise GraftrError(f"no adapter named {name!r} (the model has: {have})")
    return found


def set_active(gm, names: list[str], *, inference_mode: bool = False) -> None:
    """Make ``names`` the active adapters (in the order they were added): they compute, and, unless
    ``inference_mode``, exactly their tensors are trainable (PEFT's ``set_adapter``)."""
    for name in names:
        named(gm, name)
    _check_switchable(gm, [a for a in gm.grafting.adapters if a not in names])
    gm.grafting.active = [a for a in gm.grafting.adapters if a in names]
    trainable = set() if inference_mode else {p for a in gm.grafting.active for p in gm.grafting.adapters[a].params}
    for record in gm.grafting.adapters.values():
        for param in record.params:
            gm.get_parameter(param).requires_grad_(param in trainable)
    apply_activity(gm)


@contextlib.contextmanager
def disabled(gm):
    """Every adapter off inside the block (the base model's outputs), as it was after."""
    changed = [f"{a.name!r} {a.changes_base}" for a in gm.grafting.adapters.values() if a.changes_base]
    if changed:
        raise GraftrError(f"disable_adapter() cannot give the base model: adapter {changed[0]}")
    _check_switchable(gm, list(gm.grafting.adapters))
    before = gm.grafting.disabled
    gm.grafting.disabled = True
    apply_activity(gm)
    try:
        yield
    finally:
        gm.grafting.disabled = before
        apply_activity(gm)


def apply_activity(gm) -> None:
    """Set each adapter module's flag from the active adapters and whether adapters are disabled."""
    grafting = gm.grafting
    for record in grafting.adapters.values():
        off = grafting.disabled or record.name not in grafting.active
        for target in record.targets:
            gm.get_submodule(target).graftr_off = off


def _check_switchable(gm, names: list[str]) -> None:
    """Refuse to switch off an adapter that changed the base in place, or whose kind cannot pass through."""
    for name in names:
        record = gm.grafting.adapters[name]
        if record.changes_base:
            raise GraftrError(f"adapter {name!r} {record.changes_base}; it cannot be switched off")
        for target in record.targets:
            reason = gm.get_submodule(target).passthrough_refusal()
            if reason is not None:
                raise GraftrError(f"adapter {name!r} cannot be switched off: {reason}")


def delete(gm, name: str) -> None:
    """Remove adapter ``name``: its nodes leave the graph, its modules and parameters the model. The active
    adapters stay active; if it was the only active one, the first remaining adapter becomes active (PEFT)."""
    record = named(gm, name)
    if record.changes_base:
        raise GraftrError(f"adapter {name!r} {record.changes_base}; it cannot be deleted (load the base again)")
    if gm.graftr_outlined:
        raise GraftrError(f"cannot delete adapter {name!r}: the layers are outlined (activation checkpointing); "
                          "call gradient_checkpointing_disable() first")
    for target in record.targets:
        if (reason := gm.get_submodule(target).detach_refusal()) is not None:
            raise GraftrError(f"cannot delete adapter {name!r}: {reason}")
    remove(gm, record)
    active = [a for a in gm.grafting.active if a != name]
    if not active and gm.grafting.adapters:
        active = [next(iter(gm.grafting.adapters))]
    gm.grafting.active = active
    apply_activity(gm)


def remove(gm, record: NamedAdapter) -> None:
    """Take ``record``'s nodes out of the (flat) graph, each replaced by the value its site has without it, and its
    modules out of the model; the callers check first that every node can go (``Adapter.detach_refusal``)."""
    graph, targets = gm.graph, set(record.targets)
    stand_in: dict = {}  # each removed node -> the node now in its place
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in targets:
            stand_in.update(gm.get_submodule(node.target).detach(graph, node))
    rules = {qualified(plan.name, record.name) for plan in record.plans}
    for node in reversed(list(graph.nodes)):  # the rest of what its rules inserted (weights read, shared modules)
        if fxmeta.rule_of(node) in rules:
            if node.users:
                raise GraftrError(f"cannot remove adapter {record.name!r}: node {node.name} it inserted is still "
                                  "used")
            graph.erase_node(node)
    for site in gm.grafting.site_index.all():
        site.adapters[:] = [t for t in site.adapters if t not in targets]
        for attribute in _SITE_NODES:
            value = getattr(site, attribute, None)
            while value is not None and value in stand_in:
                value = stand_in[value]
            if hasattr(site, attribute):
                setattr(site, attribute, value)
    graph.lint()
    for target in record.modules:
        parent, _, child = target.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, child)
    del gm.grafting.adapters[record.name]
    gm.recompile()
