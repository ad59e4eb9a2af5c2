"""What every adapter module shares: how it is built from a site and how it is inserted into the graph.

Two shapes cover the linear kinds:

* an **output adapter** computes ``y' = adapter(x, y)`` from the site's input ``x`` and current output ``y``
  (IA³ output scaling, InA/LoRA branches);
* an **input adapter** computes ``x' = adapter(x)`` and the base op reads ``x'`` instead (IA³ input scaling).

Several rules on one site compose in recipe order: each output adapter receives the output left by the previous
one, and reads the input the base op currently sees. Attention kinds override :meth:`Adapter.graft`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx, nn

from graftr import fxmeta
from graftr.errors import MergeError


class Adapter(nn.Module):
    kind: ClassVar[str]
    config_cls: ClassVar[type]

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
    fxmeta.copy_meta(like, new)
    stack = dict(like.meta.get("nn_module_stack") or {})
    stack[target] = (target, cls_name)
    new.meta["nn_module_stack"] = stack


class LinearAdapter(Adapter):
    position: ClassVar[str] = "output"  # or "input"
    is_scaling: ClassVar[bool] = False  # True if the adapter only rescales (y' = y ⊙ l); a branch reads x

    def graft(self, graph: fx.Graph, site, target: str) -> list[fx.Node]:
        if self.position == "input":
            with graph.inserting_before(site.nodes[0]):
                new = graph.call_module(target, (site.input,))
            for n in site.nodes:
                n.replace_input_with(site.input, new)
            _tag(new, site.input, target, type(self).__name__)
            site.input = new
        else:
            old = site.output
            with graph.inserting_after(old):
                new = graph.call_module(target, (site.input, old))
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

    def check_merge(self) -> None:
        """Raise :class:`MergeError` with the reason if this adapter cannot be folded into the weights."""
        raise MergeError(f"{self.kind} adapters cannot be merged into the base weights")

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str):
        """Return ``(weight, bias)`` with this adapter folded in (``layout``: "out_in" or "in_out")."""
        self.check_merge()
        raise NotImplementedError
