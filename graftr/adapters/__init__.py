"""Built-in adapter kinds: their configs in :mod:`graftr.adapters.config` (torch-free), and beside it one module per
kind, named as the kind (``ia3.py`` for ``kind: ia3``). :func:`graftr.registry.kinds` imports the modules, which
register the kinds (see :mod:`graftr.registry`)."""
