"""Adapter formats on disk: graftr's own and Hugging Face PEFT's, and the ``graftr export`` command between them.

* :mod:`graftr.formats.graftr` — a graftr adapter directory: ``adapter.safetensors``, the resolved ``recipe.yaml``,
  ``manifest.json`` (versions, base model, tensor list); :func:`save_adapter`, :func:`read_manifest`.
* :mod:`graftr.formats.peft` — PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, read into a grafted
  model (:func:`~graftr.formats.peft.import_peft`) and written from one (:func:`~graftr.formats.peft.export_peft`).
* :mod:`graftr.formats.files` — what both share: atomic directory and file writers, the JSON reader, the report of
  tensors that do not fit a model.
* :mod:`graftr.formats.command` — ``graftr export``.

:func:`load_adapter` is the one place that tells the two formats apart when reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graftr.formats.graftr import save_adapter

__all__ = ["is_peft", "load_adapter", "save_adapter"]


def __getattr__(name: str) -> Any:  # save_adapter imports torch: only when used (graftr schema writes with .files)
    if name == "save_adapter":
        from graftr.formats.graftr import save_adapter

        return save_adapter
    raise AttributeError(f"module 'graftr.formats' has no attribute {name!r}")


def is_peft(path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (an ``adapter_config.json`` and no graftr ``manifest.json``)."""
    from graftr.formats.peft import peft_adapter_config

    return peft_adapter_config(Path(path)) is not None


def load_adapter(model, path, *, peft: bool | None = None, round_trip: bool = False, trust_code: bool = False,
                 adapter_name: str = "default", cls=None):
    """Graft ``model`` with the adapter in ``path`` as the adapter ``adapter_name`` and load its tensors; returns
    the :class:`GraftedModel` (a model traced here is a ``cls``: see :func:`graftr.grafted.prepare`). On a model
    that holds adapters already it becomes one more, inactive (:mod:`graftr.named`).

    ``path`` is a graftr adapter directory, a run directory of ``graftr train`` (its ``adapter/`` is read), or an HF
    PEFT adapter directory, which :func:`graftr.formats.peft.import_peft` translates. ``peft`` says which, when the
    caller has read it already.
    ``round_trip``: a graftr recipe with ``quantize:`` keeps the base dense, each weight it quantizes replaced by
    its quantize→dequantize round trip (for merging; see :func:`graftr.graft`).
    ``trust_code``: a graftr adapter whose recipe imports a user kind module saved beside it imports that module
    (code you trust, as transformers' ``trust_remote_code``); by default an adapter directory runs no code."""
    from graftr.formats import graftr as native
    from graftr.formats.peft import import_peft, import_peft_named

    path = native.adapter_dir(path)

    if peft is None:
        peft = is_peft(path)
    if not peft:
        return native.load_adapter(model, path, round_trip=round_trip, trust_code=trust_code,
                                   adapter_name=adapter_name, cls=cls)
    if adapter_name == "default" and not getattr(getattr(model, "grafting", None), "adapters", None):
        return import_peft(model, path, cls=cls)
    return import_peft_named(model, path, adapter_name)
