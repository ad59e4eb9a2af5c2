"""graftr: config-driven adapter injection for transformer models.

Trace a Hugging Face model into a torch.fx graph, match the sites a YAML recipe names, rewrite the graph to insert
parameter-efficient adapters, and train the result with DeepSpeed ZeRO.
"""

from graftr.adapters.base import Adapter, LinearAdapter
from graftr.errors import GraftrError
from graftr.grafted import GraftedModel, graft, prepare
from graftr.formats import load_adapter, save_adapter
from graftr.registry import AdapterConfig, register_adapter


def load_recipe(path):
    """Load and validate a recipe YAML file (every problem reported at once, with file and line)."""
    from graftr.recipe import load_recipe as _load

    return _load(path)


__all__ = ["Adapter", "AdapterConfig", "GraftedModel", "GraftrError", "LinearAdapter", "graft", "load_adapter",
           "load_recipe", "prepare", "register_adapter", "save_adapter"]
