"""Built-in adapter kinds: their configs in :mod:`graftr.adapters.config` (torch-free), one module per kind beside
it. :func:`graftr.registry.kinds` imports the modules, which register the kinds (see :mod:`graftr.registry`)."""

BUILTIN_MODULES = ("graftr.adapters.ia3", "graftr.adapters.ina", "graftr.adapters.gated_prompt",
                   "graftr.adapters.scale_bias")
