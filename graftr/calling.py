"""Calling a grafted graph as its Hugging Face class is called: the forward signature, a call bound to the graph's
tensor inputs, and ``logits_to_keep``.

The graph takes the tensor inputs :func:`graftr.trace.trace_spec` chose (``input_ids``, ``attention_mask``, ...);
HF code calls a model with the HF class's keyword arguments, ``input_ids`` maybe positional, plus flags the graph has
no input for. :func:`adopt_signature` records the HF class's forward signature on the grafted model's class when
it is traced (``inspect.signature(model.forward)`` is how ``Trainer`` keeps dataset columns and how ``generate``
checks model kwargs), and :func:`bind_forward` maps a call onto the graph's inputs: arguments the graph cannot
honour (``inputs_embeds``, ``past_key_values``) are refused with a reason, flags such as ``use_cache`` are ignored.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from graftr.errors import GraftrError

# HF forward arguments the graph has no input for: flags without effect here, and flags refused when true
_IGNORED_ANY = ("use_cache", "return_dict")
_FALSE_ONLY = ("output_attentions", "output_hidden_states")
LOSS_ARGUMENTS = ("labels", "num_items_in_batch", "logits_to_keep")


def adopt_signature(gm, model: nn.Module) -> None:
    """Show the forward signature of ``model`` (the HF module ``gm`` was traced from) on ``gm``'s class, and record
    the module paths of its input and output embeddings in ``gm.grafting.embeddings``."""
    cls = type(gm)
    cls._graftr_signature = forward_signature(type(model))
    cls.forward = hf_forward(cls)
    paths = {id(m): name for name, m in model.named_modules()}
    for which in ("input", "output"):
        try:
            module = getattr(model, f"get_{which}_embeddings")()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None and id(module) in paths:
            gm.grafting.embeddings[which] = paths[id(module)]


def hf_forward(cls):
    """The ``forward`` of a grafted model's class: its ``_hf_forward``, showing the HF class's signature once
    :func:`adopt_signature` recorded it (each graph has its own class, so each its own function)."""
    signature = cls.__dict__.get("_graftr_signature")
    if signature is None:
        return cls._hf_forward

    @functools.wraps(cls._hf_forward)
    def forward(self, *args, **kwargs):
        return type(self)._hf_forward(self, *args, **kwargs)

    forward.__signature__ = signature
    return forward


def forward_signature(hf_cls) -> inspect.Signature:
    """The HF class's forward signature (``self`` included), with ``**kwargs`` so loss kwargs pass."""
    sig = inspect.signature(hf_cls.forward)
    params = list(sig.parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return sig.replace(parameters=params, return_annotation=inspect.Signature.empty)


def bind_forward(gm, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(graph keyword arguments, loss arguments)`` of a call ``gm(*args, **kwargs)`` made as to the HF model.

    Positional arguments take the HF forward's parameters in order (``model(input_ids)``); the loss arguments are
    ``labels``, ``num_items_in_batch`` and ``logits_to_keep``. Arguments the graph takes pass through; anything else
    must be None (or a flag without effect) or the call is refused."""
    sig = getattr(type(gm), "_graftr_signature", None)
    if args:
        if sig is None:
            raise TypeError("a grafted model built without its HF class takes keyword arguments only")
        try:
            bound = sig.bind_partial(gm, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(gm).__name__}.forward(): {e}") from None
        kwargs = {}
        for name, value in list(bound.arguments.items())[1:]:
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[name] = value
    names = gm.graftr_input_names
    loss = {k: kwargs.pop(k) for k in LOSS_ARGUMENTS if k in kwargs}
    for flag in _FALSE_ONLY:
        if kwargs.pop(flag, False):
            raise GraftrError(f"{flag}=True is not supported by a grafted model (the graph returns logits only)")
    for flag in _IGNORED_ANY:
        kwargs.pop(flag, None)
    known = set(sig.parameters) if sig is not None else set()
    unknown = sorted(k for k in kwargs if k not in names and k not in known)
    if unknown:
        raise TypeError(f"{type(gm).__name__}.forward() got unexpected keyword arguments {unknown}; "
                        f"it takes {names} and labels")
    unsupported = sorted(k for k, v in kwargs.items() if k not in names and v is not None)
    if unsupported:
        raise GraftrError(f"{', '.join(unsupported)}: not supported by a grafted model (its graph takes "
                          f"{', '.join(names)})")
    return {k: v for k, v in kwargs.items() if k in names}, loss


def keep_logits(logits: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """HF's ``logits_to_keep``: an int keeps that many last positions (0: all), a tensor the positions it lists."""
    if logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return logits
    if isinstance(logits_to_keep, int):
        return logits[:, -logits_to_keep:]
    return logits[:, logits_to_keep]
