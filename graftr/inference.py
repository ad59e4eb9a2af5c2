"""Loading a base model with its real weights and, optionally, a trained adapter: what merge, generate and eval share.

The adapter is checked against the base's config before any weight is read, so a mismatched base fails fast with
the fields that differ; a model given only as a config (a bundled snapshot, a config.json) is refused because
these commands compute with the weights. ``--adapter`` may also be a PEFT adapter directory (an
``adapter_config.json`` and no graftr ``manifest.json``: LoRA/InA, IA3 or AdaptionPrompt), imported with
:func:`graftr.peft_format.import_peft`; its base defaults to the config's ``base_model_name_or_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graftr.errors import AdapterLoadError, GraftrError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    source: object  # graftr.models.ModelSource
    model: nn.Module  # the HF model; the graph shares its parameters
    gm: object  # graftr.grafted.GraftedModel, with the adapter grafted and loaded if one was given
    recipe: object | None  # the adapter's recipe
    manifest: dict | None  # the adapter's manifest


def add_model_arguments(parser, *, adapter_required: bool) -> None:
    """``--model``, ``--adapter`` and ``--dtype``, worded the same for every command."""
    parser.add_argument("--model", help="base model: a directory with weights or a hub id in the local cache; "
                                        "default: the base recorded in the adapter")
    parser.add_argument("--adapter", required=adapter_required, help="a graftr adapter directory (from train or "
                        "apply), or a PEFT adapter directory (LoRA/InA, IA3, AdaptionPrompt)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")


def load_for_inference(model_arg: str | None, adapter: str | None, *, dtype: torch.dtype | None = None,
                       console=None) -> Loaded:
    """Resolve the base (``model_arg``, else the adapter's recorded base), load its weights, graft the adapter."""
    from graftr.grafted import prepare
    from graftr.io import RECIPE, check_made_for, load_adapter, read_manifest
    from graftr.models import infer_task, load_model, resolve
    from graftr.peft_format import TASKS, import_peft, peft_adapter_config, peft_num_labels
    from graftr.recipe import load_recipe

    manifest = recipe = peft = None
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise AdapterLoadError(f"adapter directory {adapter} does not exist")
        peft = peft_adapter_config(adapter)
        if peft is None:
            manifest = read_manifest(adapter)
            recipe = load_recipe(Path(adapter) / RECIPE)
    model_id = (model_arg or (manifest or {}).get("base_model") or (recipe.model if recipe else None)
                or (peft or {}).get("base_model_name_or_path"))
    if not model_id:
        raise GraftrError("no model given: pass --model (a model directory with weights or a cached hub id)")
    source = resolve(model_id)
    if console is not None and source.note:
        console.print(f"[yellow]note:[/] {source.note}")
    if manifest is not None:  # before reading any weight
        check_made_for(manifest, source.config, adapter, model_id)
    task = ((recipe.task if recipe else None) or (manifest or {}).get("task")
            or TASKS.get((peft or {}).get("task_type")) or infer_task(source.config))
    labels = _trained_labels(manifest, task)
    num_labels = ((recipe.num_labels if recipe else None) or (len(labels) if labels else None)
                  or (peft_num_labels(adapter) if peft is not None else None))
    model = load_model(source, task, dtype=dtype, num_labels=num_labels)
    if labels and len(labels) == model.config.num_labels:  # the label names the adapter was trained with
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if adapter is None:
        gm = prepare(model, model_id=source.model_id, task=task)
    elif peft is not None:
        gm = import_peft(model, adapter)
        gm.model_id, recipe = source.model_id, gm.recipe
    else:
        gm = load_adapter(model, adapter)
    gm.eval()
    return Loaded(source, model, gm, recipe, manifest)


def _trained_labels(manifest: dict | None, task: str) -> list[str] | None:
    """The label names in the config the adapter was trained on (classification heads only)."""
    if manifest is None or task not in ("seq_cls", "token_cls"):
        return None
    id2label = (manifest.get("base_config") or {}).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else None


def recipe_data(recipe) -> dict | None:
    """The recipe's ``train.data`` section (the fields it sets of a :class:`graftr.data.DataConfig`), or None."""
    train = getattr(recipe, "train", None)
    if train is None:
        return None
    data = train.get("data") if isinstance(train, dict) else getattr(train, "data", None)
    if data is None:
        return None
    return data.model_dump(exclude_unset=True) if hasattr(data, "model_dump") else dict(data)
