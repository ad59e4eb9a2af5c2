"""Loading a base model and an adapter for the commands that use a trained one (merge, generate, eval, export).

The adapter is checked against the base's config before any weight is read, so a mismatched base fails fast with
the fields that differ; a model given only as a config (a bundled snapshot, a config.json) is refused because
these commands compute with the weights. ``--adapter`` may also be a PEFT adapter directory (an
``adapter_config.json`` and no graftr ``manifest.json``: LoRA/InA, IA3 or AdaptionPrompt), imported with
:func:`graftr.formats.peft.import_peft`; its base defaults to the config's ``base_model_name_or_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graftr.errors import AdapterLoadError, GraftrError
from graftr.names import CLASSIFICATION_TASKS, DTYPES

@dataclass
class Loaded:
    source: object  # graftr.models.ModelSource
    model: nn.Module  # the HF model; the graph shares its parameters
    gm: object  # graftr.grafted.GraftedModel, with the adapter grafted and loaded if one was given
    recipe: object | None  # the adapter's recipe
    manifest: dict | None  # the adapter's manifest


def add_model_arguments(parser, *, adapter_required: bool, several: bool = False) -> None:
    """``--model``, ``--adapter`` and ``--dtype``, worded the same for every command; ``several``: ``--adapter`` may
    be repeated (a list, every adapter loaded into one model: :func:`load_adapters`)."""
    parser.add_argument("--model", help="base model: a directory with weights or a hub id in the local cache; "
                                        "default: the base recorded in the (first) adapter")
    parser.add_argument("--adapter", required=adapter_required, action="append" if several else "store",
                        help="a graftr adapter directory (from train or apply), or a PEFT adapter directory "
                        "(LoRA/InA, IA3, AdaptionPrompt)" + ("; repeat the flag to compare several adapters on one "
                                                              "base (each is run alone)" if several else ""))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    add_trust_argument(parser)


def add_trust_argument(parser) -> None:
    """``--trust-code``, for every command that loads an adapter directory."""
    parser.add_argument("--trust-code", action="store_true", help="import the adapter kind module saved beside the "
                        "adapter (its recipe's imports:); without it an adapter directory runs no code")


@dataclass
class Base:
    """The base an adapter goes on and how to build it, decided from configs before any weight is read."""
    source: object  # graftr.models.ModelSource
    task: str
    num_labels: int | None  # None: the base config's own
    labels: list[str] | None  # the label names the adapter was trained with (classification heads)
    recipe: object | None  # a graftr adapter's recipe
    manifest: dict | None  # a graftr adapter's manifest
    peft: dict | None  # a PEFT adapter's adapter_config.json
    trust_code: bool = False  # import the user kind modules saved beside the adapter


def resolve_base(model_arg: str | None, adapter: str | None, *, weights: bool, console=None,
                 trust_code: bool = False) -> Base:
    """Resolve the base (``model_arg``, else the adapter's recorded base) and check the adapter against its config.
    ``weights`` says whether the caller will read the base's weights (only the hint of a missing ``--model``)."""
    from graftr.formats.graftr import RECIPE, adapter_dir, check_made_for, read_manifest
    from graftr.formats.peft import FROM_TASK_TYPE, peft_adapter_config, peft_num_labels
    from graftr.models import infer_task, resolve
    from graftr.recipe import load_recipe

    manifest = recipe = peft = None
    if adapter is not None:
        path = adapter_dir(adapter)
        adapter = str(path)
        if not path.is_dir():
            raise AdapterLoadError(f"adapter directory {adapter} does not exist")
        peft = peft_adapter_config(path)
        if peft is None:
            manifest = read_manifest(path)
            if not (path / RECIPE).is_file():
                raise AdapterLoadError(f"{adapter} is incomplete: {RECIPE} is missing")
            recipe = load_recipe(path / RECIPE, local_imports=trust_code)  # data: no code beside it, unless trusted
    model_id = (model_arg or (manifest or {}).get("base_model") or (recipe.model if recipe else None)
                or (peft or {}).get("base_model_name_or_path"))
    if not model_id:
        what = "the adapter records no base model" if adapter is not None else "no model given"
        hint = "a model directory with weights or a cached hub id" if weights else \
            "a model directory, a config.json or a hub id"
        raise GraftrError(f"{what}: pass --model ({hint})")
    if not model_arg and adapter is not None:  # recorded relative to where training ran: try the adapter's place
        model_id = _recorded_base(model_id, Path(adapter))
    source = resolve(model_id)
    if console is not None and source.note:
        console.print(f"[yellow]note:[/] {source.note}")
    if manifest is not None:  # before reading any weight
        check_made_for(manifest, source.config, adapter, model_id)
    task = ((recipe.task if recipe else None) or (manifest or {}).get("task")
            or FROM_TASK_TYPE.get((peft or {}).get("task_type")) or infer_task(source.config))
    labels = _trained_labels(manifest, task)
    num_labels = ((recipe.num_labels if recipe else None) or (len(labels) if labels else None)
                  or (peft_num_labels(adapter, peft) if peft is not None else None))
    return Base(source, task, num_labels, labels, recipe, manifest, peft, trust_code)


def _recorded_base(model_id: str, adapter: Path) -> str:
    """A base an adapter recorded as a relative path (older adapters; a recipe's relative ``model``), resolved from
    the working directory, else against the adapter's recipe (its directory) and the run directory holding it."""
    path = Path(model_id).expanduser()
    if path.is_absolute() or path.exists():
        return model_id
    for folder in (adapter, adapter.parent):
        if (folder / path / "config.json").is_file() or (folder / path).is_file():
            return str((folder / path).resolve())
    return model_id  # a hub id (or a path that is nowhere: resolve says so)


def graft_adapter(model: nn.Module, adapter: str, base: Base, *, round_trip: bool = False, cls=None):
    """``model`` (the base, on the meta device or with weights) with the adapter in ``adapter`` grafted and its
    tensors loaded: a ``GraftedModel`` (a ``cls``, see :func:`graftr.grafted.prepare`) whose ``model_id`` is the base
    used. An adapter whose recipe quantizes the base gets it quantized, as in training (``round_trip``: dense
    weights equal to the quantized ones, for merging)."""
    from graftr.formats import load_adapter

    gm = load_adapter(model, adapter, peft=base.peft is not None, round_trip=round_trip, trust_code=base.trust_code,
                      cls=cls)
    gm.model_id = base.source.model_id
    return gm


def load_for_inference(model_arg: str | None, adapter: str | None, *, dtype: torch.dtype | None = None,
                       console=None, trust_code: bool = False, cls=None) -> Loaded:
    """Resolve the base (``model_arg``, else the adapter's recorded base), load its weights, graft the adapter (the
    model traced as a ``cls``: see :func:`graftr.grafted.prepare`)."""
    base = resolve_base(model_arg, adapter, weights=True, console=console, trust_code=trust_code)
    return load_with_weights(base, adapter, dtype=dtype, cls=cls)


def load_with_weights(base: Base, adapter: str | None, *, dtype: torch.dtype | None = None,
                      round_trip: bool = False, cls=None) -> Loaded:
    """Load ``base`` with its weights and graft ``adapter`` (None: the bare base, prepared), in eval mode
    (``round_trip``: see :func:`graft_adapter`; ``cls``: the class to trace into, :func:`graftr.grafted.prepare`)."""
    from graftr.grafted import prepare
    from graftr.models import load_model

    model = load_model(base.source, base.task, dtype=dtype, num_labels=base.num_labels)
    labels = base.labels
    if labels and len(labels) == model.config.num_labels:  # the label names the adapter was trained with
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if adapter is None:
        gm = prepare(model, model_id=base.source.model_id, task=base.task, cls=cls)
    else:
        gm = graft_adapter(model, adapter, base, round_trip=round_trip, cls=cls)
    gm.eval()
    return Loaded(base.source, model, gm, gm.recipe if adapter is not None else None, base.manifest)


def load_adapters(model_arg: str | None, adapters: list[str] | None, *, dtype: torch.dtype | None = None,
                  console=None, trust_code: bool = False) -> tuple[Loaded, dict[str, str]]:
    """The base (``model_arg``, else the first adapter's recorded base) with every adapter in ``adapters`` loaded
    into one model (:mod:`graftr.named`; each checked against the base): ``(loaded, {adapter path: adapter name})``,
    the first adapter ``"default"`` and active, the others ``adapter2``, ``adapter3``, ... in the order given."""
    from graftr.formats import load_adapter
    from graftr.named import DEFAULT

    adapters = list(dict.fromkeys(adapters or []))  # the same directory twice is one adapter
    loaded = load_for_inference(model_arg, adapters[0] if adapters else None, dtype=dtype, console=console,
                                trust_code=trust_code)
    names = {path: DEFAULT if i == 0 else f"adapter{i + 1}" for i, path in enumerate(adapters)}
    for path in adapters[1:]:
        load_adapter(loaded.gm, path, adapter_name=names[path], trust_code=trust_code)
    loaded.gm.eval()
    return loaded, names


def _trained_labels(manifest: dict | None, task: str) -> list[str] | None:
    """The label names in the config the adapter was trained on (classification heads only)."""
    if manifest is None or task not in CLASSIFICATION_TASKS:
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
