"""Activation checkpointing: every outlined layer is recomputed in backward instead of keeping its activations.

``train.activation_checkpointing: layers`` (and :meth:`graftr.GraftedModel.gradient_checkpointing_enable`) outlines
the decoder layers (:func:`graftr.outline.outline_layers`, if they are not yet) and rewrites each layer call of the
root graph, ``call_module model.layers.3 (x, mask, cos, sin)``, into ``call_function run_layer (layer, x, mask, cos,
sin)``. :func:`run_layer` runs the layer under ``torch.utils.checkpoint.checkpoint`` when the model is training and
autograd records: forward keeps only the layer's inputs, and backward runs the layer again, from those inputs,
before going through it — peak memory held for backward is the layer inputs of every layer plus one layer's
activations, instead of every layer's activations.

Exactness
    The recompute restores the random state the layer's forward started from (``preserve_rng_state``: the CPU
    generator and that of every device the inputs are on), so dropout draws the same masks twice and gradients
    equal those of the run without checkpointing.
Non-reentrant
    graftr uses torch's non-reentrant checkpoint (``use_reentrant=False``). The reentrant one computes parameter
    gradients only when an input of the layer requires grad, which the first layer's input (frozen embeddings)
    does not: it would silently drop the gradients of that layer's adapters (HF works around it with
    ``enable_input_require_grads``).
ZeRO-3
    The layer is called as a module both times, so DeepSpeed's ZeRO-3 forward hooks gather its parameters again for
    the recompute and release them after; the layer's weights are never held between forward and backward.
``torch.compile``
    Dynamo traces the checkpoint as its higher-order op (the recompute is part of the compiled backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from graftr.errors import GraftrError

# keyword arguments of torch.utils.checkpoint.checkpoint a user may set (gradient_checkpointing_kwargs)
_ALLOWED = ("preserve_rng_state", "determinism_check", "debug")


def run_layer(layer: nn.Module, *args: Any, **options: Any):
    """``layer(*args)``, recomputed in backward when ``layer`` is training and autograd is recording."""
    if layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **options)
    return layer(*args)


def _options(kwargs: dict | None) -> dict[str, Any]:
    options = dict(kwargs or {})
    if options.pop("use_reentrant", False):
        raise GraftrError("gradient_checkpointing_kwargs use_reentrant=True is not supported: a reentrant checkpoint "
                          "computes no gradient for the adapters of a layer whose input needs none (the first "
                          "layer's); graftr uses use_reentrant=False")
    unknown = sorted(set(options) - set(_ALLOWED))
    if unknown:
        raise GraftrError(f"gradient_checkpointing_kwargs {unknown} are not supported; allowed: {', '.join(_ALLOWED)}")
    for key, value in options.items():
        if not isinstance(value, (bool, str)):
            raise GraftrError(f"gradient_checkpointing_kwargs {key} must be a bool or a string, got {value!r}")
    return options


def enable(gm: fx.GraphModule, kwargs: dict | None = None) -> list[str]:
    """Recompute every layer of ``gm`` in backward (in place); outlines the layers first if needed.

    Returns the checkpointed layers. Calling it again replaces the options.
    """
    from graftr.outline import outline_layers

    options = _options(kwargs)
    disable(gm, keep_outlined=True)
    if not getattr(gm, "graftr_outlined", None):
        flat = gm.graph  # outlining builds a new root graph and leaves this one as it is
        containers = dict(gm.named_modules())
        outline_layers(gm)
        # disable() returns to this very flat graph, whose nodes the site index (merge_, named adapters, base_model)
        # refers to, and to the layers' own containers
        gm.__dict__["_graftr_flat"] = (flat, {k: containers[k] for k in gm.graftr_outlined})
    layers = set(gm.graftr_outlined)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in layers:
            with graph.inserting_before(node):
                module = graph.get_attr(node.target)
                call = graph.call_function(run_layer, (module, *node.args), dict(options))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.__dict__["_graftr_checkpointing"] = options
    return sorted(layers, key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])))


def disable(gm: fx.GraphModule, *, keep_outlined: bool = False) -> None:
    """Keep activations again (in place). Layers :func:`enable` outlined go back to the flat graph unless
    ``keep_outlined``."""
    if gm.__dict__.pop("_graftr_checkpointing", None) is None:
        return
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is run_layer:
            module = node.args[0]
            with graph.inserting_before(node):
                call = graph.call_module(module.target, tuple(node.args[1:]))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            if not module.users:
                graph.erase_node(module)
    if "_graftr_flat" in gm.__dict__ and not keep_outlined:
        flat, containers = gm.__dict__.pop("_graftr_flat")
        for key, container in containers.items():  # the same children: parameters and adapters are unchanged
            parent, _, name = key.rpartition(".")
            gm.get_submodule(parent)._modules[name] = container
        gm.graph = flat  # recompiles
        gm.graftr_outlined = []
        return
    graph.lint()
    gm.recompile()


def enabled(gm: nn.Module) -> bool:
    return gm.__dict__.get("_graftr_checkpointing") is not None
