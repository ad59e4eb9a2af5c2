"""graftr: config-driven adapter injection for transformer models.

Trace a Hugging Face model into a torch.fx graph, match the sites a YAML recipe names, rewrite the graph to insert
parameter-efficient adapters, and train the result with DeepSpeed ZeRO.

The names below are imported on first use (PEP 562), so ``import graftr`` and the command line start without
loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Adapter": "graftr.adapters.base",
    "LinearAdapter": "graftr.adapters.base",
    "GraftrError": "graftr.errors",
    "GraftedModel": "graftr.hf",
    "graft": "graftr.hf",
    "prepare": "graftr.hf",
    "load_adapter": "graftr.hf",
    "save_adapter": "graftr.formats",
    "AdapterConfig": "graftr.registry",
    "register_adapter": "graftr.registry",
}

if TYPE_CHECKING:
    from graftr.adapters.base import Adapter, LinearAdapter
    from graftr.errors import GraftrError
    from graftr.formats import save_adapter
    from graftr.hf import GraftedModel, graft, load_adapter, prepare
    from graftr.registry import AdapterConfig, register_adapter


def load_recipe(path):
    """Load and validate a recipe YAML file (every problem reported at once, with file and line)."""
    from graftr.recipe import load_recipe as _load

    return _load(path)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graftr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["Adapter", "AdapterConfig", "GraftedModel", "GraftrError", "LinearAdapter", "graft", "load_adapter",
           "load_recipe", "prepare", "register_adapter", "save_adapter"]
