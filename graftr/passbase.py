"""The one shape of a graph pass, and the manager that runs passes.

Every pass over a grafted graph is a :class:`GraphPass`: torch.fx's ``PassBase`` (``call(gm) -> PassResult(gm,
modified)``, with optional ``requires(gm)``/``ensures(gm)`` checks run before and after it) with a ``name`` that
errors use. :class:`PassManager` runs passes in order; after each one that modified the graph it lints the graph
and recompiles it, and an error is reported with the name of the pass it came from:

* a :class:`~graftr.errors.GraftrError` (caused by user input: a recipe, a model graftr cannot treat) passes
  through unchanged — the command line prints it as one line;
* any other exception keeps its type and traceback and gets a note naming the pass and the passes before it;
* an invalid graph after a pass raises ``RuntimeError("the <name> pass produced an invalid graph: ...")``.

The passes (annotate first, then transform):

==========================  ==========================================  ============================================
pass                        module                                      what it does
==========================  ==========================================  ============================================
``normalize_modes``         :mod:`graftr.trace`                         dropout/SDPA as modules following the mode
``share_position_rows``     :mod:`graftr.trace`                         default positions computed once, not per row
``quantize``                :mod:`graftr.quantize`                      frozen linears → packed storage + bitsandbytes
``match``                   :mod:`graftr.passes`                        tags each rule's sites (annotate only)
``vision_input``            :mod:`graftr.vision`                        ``pixel_values`` input and the image vector
``rewrite``                 :mod:`graftr.passes`                        inserts the adapters at the tagged sites
``cpu_fp32_matmul``         :mod:`graftr.cpu_matmul`                    16-bit frozen linears computed in fp32 (CPU)
``outline_layers``          :mod:`graftr.outline`                       each layer a submodule (ZeRO-3)
``enable_kv_cache``         :mod:`graftr.cache`                         SDPA modules that keep keys and values
``merge_adapters``          :mod:`graftr.grafted`                       folds adapters into the base weights
==========================  ==========================================  ============================================

Adding a pass (a quantization of the base, activation checkpointing, ...):

1. subclass :class:`GraphPass` in the module of the feature, with ``name = "my_pass"``, the pass's settings as
   ``__init__`` arguments, and ``call(self, gm)`` returning ``PassResult(gm, modified)`` — modified is whether the
   graph or its modules changed; do not lint or recompile (the manager does);
2. put checks of what the pass needs in ``requires(gm)`` and of what it promises in ``ensures(gm)``, raising
   :class:`~graftr.errors.GraftrError` with a one-line reason where user input is the cause;
3. record provenance on nodes the pass creates (:func:`graftr.fxmeta.copy_meta` with a ``graftr_<pass>`` key) and
   read ``node.meta`` only through :mod:`graftr.fxmeta`;
4. run it with :func:`run_passes` where the flow needs it (``graft`` for passes of every grafted model, the training
   set-up for training-only ones) and test it like a rewrite: tiny model, exact counts, ``graph.lint()``, equal
   outputs against the eager reference.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graftr.errors import GraftrError

__all__ = ["GraphPass", "PassBase", "PassManager", "PassResult", "run_passes"]


class GraphPass(PassBase):
    """A pass over a grafted graph: implement ``call(gm) -> PassResult``; ``name`` names it in errors."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def __repr__(self) -> str:
        return f"<graph pass {self.name}>"


def pass_name(p) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def lint(gm: fx.GraphModule, name: str) -> None:
    """``gm.graph.lint()`` (and that of every outlined submodule), naming the pass that left the graph invalid."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            try:
                module.graph.lint()
            except Exception as e:  # lint raises RuntimeError/AssertionError describing the bad node
                problem = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise RuntimeError(f"the {name} pass produced an invalid graph: {problem}") from e


class PassManager:
    """Run ``passes`` in order on a graph module; lint and recompile after each one that modified it."""

    def __init__(self, passes: list[PassBase]):
        self.passes = list(passes)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for done, p in enumerate(self.passes):
            name = pass_name(p)
            try:
                result = p(gm)
            except GraftrError:
                raise
            except Exception as e:
                before = ", ".join(pass_name(q) for q in self.passes[:done]) or "none"
                e.add_note(f"in graftr's {name} pass (passes run before it: {before})")
                raise
            if not isinstance(result, PassResult):
                raise TypeError(f"the {name} pass returned {type(result).__name__}, not a PassResult")
            gm = result.graph_module
            if result.modified:
                lint(gm, name)
                gm.recompile()
                modified = True
        return PassResult(gm, modified)


def run_passes(gm: fx.GraphModule, *passes: PassBase) -> PassResult:
    """``PassManager(passes)(gm)``."""
    return PassManager(list(passes))(gm)
