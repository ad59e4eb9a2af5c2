"""What every adapter module shares: how it is built from a site and how it is inserted into the graph.

Two shapes cover the linear kinds:

* an **output adapter** computes ``y' = adapter(x, y)`` from the site's input ``x`` and current output ``y``
  (IA³ output scaling, InA/LoRA branches);
* an **input adapter** computes ``x' = adapter(x)`` and the base op reads ``x'`` instead (IA³ input scaling).

Several rules on one site compose in recipe order: each output adapter receives the output left by the previous
one, and reads the input the base op currently sees. Attention kinds override :meth:`Adapter.graft`.

An adapter can be switched off (an inactive named adapter, ``disable_adapter()``: :mod:`graftr.named`): its node then
returns the value its site would have without it (:meth:`Adapter.passthrough`), and deleting it rewires the graph
the same way (:meth:`Adapter.detach`). A kind whose node returns one of its arguments unchanged when absent names
that argument (:attr:`Adapter.identity_arg`: the output ``y`` of an output adapter, the input ``x`` of an input
adapter, the attention output of a gated prompt); others override both methods, or cannot be switched off.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx, nn

from graftr import fxmeta
from graftr.errors import GraftrError, MergeError


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also while ZeRO-3 holds it partitioned (its data is then empty: ``ds_shape``)."""
    return getattr(p, "ds_shape", p.shape)


class Adapter(nn.Module):
    """Everything a kind knows lives on its module class, in the kind's one file: how it is built from a site
    (:meth:`from_site`, :meth:`shared_for_rule`), inserted (:meth:`graft`), merged (linear kinds:
    :meth:`LinearAdapter.merge_refusal`, :meth:`~LinearAdapter.check_merge`, :meth:`~LinearAdapter.merge_into`) and
    written in PEFT's format (:attr:`peft_type`, :meth:`from_peft`, :meth:`to_peft`, :meth:`peft_adapters`, or
    :attr:`peft_refusal`: why PEFT cannot hold it)."""

    kind: ClassVar[str]
    config_cls: ClassVar[type]
    peft_type: ClassVar[str | None] = None  # the PEFT type (adapter_config.json's peft_type) this kind reads/writes
    peft_refusal: ClassVar[str | None] = None  # why graftr export --format peft refuses this kind (one line)
    identity_arg: ClassVar[int | None] = None  # the argument of its node that is the site's value without it
    graftr_off: bool = False  # set by graftr.named: the node returns passthrough(...) instead of computing

    def __call__(self, *args, **kwargs):
        if self.graftr_off:  # an inactive or disabled adapter: its site as if it were absent (no hooks, no compute)
            return self.passthrough(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def passthrough(self, *args, **kwargs):
        """What this adapter's node gives while the adapter is off: the value its site has without it."""
        return args[self.identity_arg]

    def passthrough_refusal(self) -> str | None:
        """Why this adapter cannot be switched off (one line), else None."""
        if self.identity_arg is None and type(self).passthrough is Adapter.passthrough:
            return f"the {self.kind} kind defines no passthrough (graftr.adapters.base.Adapter.identity_arg)"
        return None

    def detach_refusal(self) -> str | None:
        """Why this adapter's node cannot be removed from the graph (one line), else None."""
        if self.identity_arg is None and type(self).detach is Adapter.detach:
            return f"{self.kind} adapters cannot be removed from the graph (switch them off instead)"
        return None

    def detach(self, graph: fx.Graph, node: fx.Node) -> dict[fx.Node, fx.Node]:
        """Remove this adapter's ``node`` from ``graph``, its site left as if it had never been grafted; returns
        ``{removed node: the node now in its place}``."""
        if (reason := self.detach_refusal()) is not None:
            raise GraftrError(reason)
        keep = node.args[self.identity_arg]
        node.replace_all_uses_with(keep)
        graph.erase_node(node)
        return {node: keep}

    @classmethod
    def from_peft(cls, model, config: dict, tensors: dict, where: str):
        """Graft ``model`` as the PEFT ``config`` (of :attr:`peft_type`) says and load ``tensors`` (PEFT's keys);
        ``where`` names the adapter in errors. Returns the grafted model (:func:`graftr.formats.peft.import_peft`)."""
        raise NotImplementedError

    @classmethod
    def to_peft(cls, gm) -> tuple[dict, dict]:
        """``(adapter_config.json, tensors under PEFT's keys)`` for ``gm``, whose adapters are all of this kind;
        refuses, with the reason, what :attr:`peft_type` cannot express (:func:`graftr.formats.peft.export_peft`)."""
        raise NotImplementedError

    @classmethod
    def peft_adapters(cls, config: dict) -> list[dict]:
        """The graftr adapter configs (kind and the options the PEFT ``config`` alone decides) it imports as, for
        checks made before any weight is read (``graftr merge``)."""
        return [{"kind": cls.kind}]

    @classmethod
    def from_site(cls, config, site, *, device: torch.device) -> "Adapter":
        """Build the module for one site (kinds with a shared module also take ``shared=<its module path>``)."""
        raise NotImplementedError

    @classmethod
    def shared_for_rule(cls, config, sites: list, *, stack_size: int | None, device: torch.device) -> nn.Module | None:
        """Parameters shared by all of a rule's ``sites`` in one layer stack of ``stack_size`` layers, or None.

        :func:`graftr.passes.rewrite` installs the module once per stack at ``<stack prefix>.<rule name>`` and
        passes its path to :meth:`from_site`; the per-site modules reach it through graph nodes, never as a child.
        """
        return None

    def graft(self, graph: fx.Graph, site, target: str) -> list[fx.Node]:
        """Insert this adapter's node(s) at ``site`` and update the site's current input/output."""
        raise NotImplementedError


def _tag(new: fx.Node, like: fx.Node, target: str, cls_name: str) -> None:
    fxmeta.copy_meta_inside(like, new, target, cls_name)


class LinearAdapter(Adapter):
    position: ClassVar[str] = "output"  # or "input"
    is_scaling: ClassVar[bool] = False  # True if the adapter only rescales (y' = y ⊙ l); a branch reads x
    identity_arg: ClassVar[int] = -1  # an output adapter's y, an input adapter's x

    def site_args(self, site) -> tuple:
        """What the node reads besides the site's input (and, for an output adapter, its output)."""
        return ()

    def graft(self, graph: fx.Graph, site, target: str) -> list[fx.Node]:
        if self.position == "input":
            with graph.inserting_before(site.nodes[0]):
                new = graph.call_module(target, (site.input, *self.site_args(site)))
            for n in site.nodes:
                n.replace_input_with(site.input, new)
            _tag(new, site.input, target, type(self).__name__)
            site.input = new
        else:
            old = site.output
            with graph.inserting_after(old):
                new = graph.call_module(target, (site.input, old, *self.site_args(site)))
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            _tag(new, old, target, type(self).__name__)
            site.output = new
        return [new]

    @classmethod
    def merge_refusal(cls, config) -> str | None:
        """Why adapters with ``config`` cannot be folded into the weights, as far as the config alone tells, else
        None. ``graftr merge`` asks before it reads any base weight; :meth:`check_merge` is the check on the module.
        A kind that overrides :meth:`check_merge` is asked there (unless it overrides this too)."""
        if cls.check_merge is LinearAdapter.check_merge:
            return f"{cls.kind} adapters cannot be merged into the base weights"
        return None

    @staticmethod
    def check_site_merge(path: str, adapters: list[LinearAdapter]) -> None:
        """The merge rule of the adapters on one linear site, in the order they apply: each must merge
        (:meth:`check_merge`), and an input scaling may not follow a branch (the branch read the unscaled input, so
        no single weight computes both). Raises :class:`MergeError` naming the site."""
        branch_before = False
        for module in adapters:
            module.check_merge()
            if module.position == "input" and branch_before:
                raise MergeError(f"{path}: input scaling after a branch adapter on the same site cannot be merged "
                                 "exactly (the branch reads the unscaled input)")
            branch_before = branch_before or not module.is_scaling

    def check_merge(self) -> None:
        """Raise :class:`MergeError` with the reason if this adapter cannot be folded into the weights."""
        raise MergeError(f"{self.kind} adapters cannot be merged into the base weights")

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str):
        """Return ``(weight, bias)`` with this adapter folded in (``layout``: "out_in" or "in_out")."""
        self.check_merge()
        raise NotImplementedError


class ExpertAdapter(LinearAdapter):
    """A linear kind's form on an expert site (:class:`graftr.sites.ExpertSite`): it computes on the routed rows
    (S, in), sorted by expert, with the site's ``offsets`` (E,) saying which rows are whose, and holds parameters per
    expert (``subset``: the experts a rule's ``match.experts`` selected, :class:`graftr.moe.ExpertSubset`). Its node
    is ``adapter(x, y, offsets)`` (output) or ``adapter(x, offsets)`` (input). ``merge_into`` folds it into the
    fused (E, out, in) weight (``layout`` "out_in"; gpt-oss's (E, in, out) is "in_out") and (E, out) bias."""

    def site_args(self, site) -> tuple:
        return (site.offsets,)

    @property
    def identity_arg(self) -> int:  # (x, y, offsets): y; (x, offsets): x
        return 1 if self.position == "output" else 0


def expert_rows(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """A fused expert weight as (E, out, in) (a view)."""
    return weight if layout == "out_in" else weight.transpose(1, 2)
