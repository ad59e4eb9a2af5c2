"""graftr's adapter format: saving and loading adapter directories.

An adapter directory holds three files, written atomically (a temporary sibling directory renamed into place, so
a crash never leaves a half-written adapter and never destroys the previous one):

* ``adapter.safetensors`` – every trainable tensor (adapter parameters and the recipe's trainable modules) under
  its full parameter name, e.g. ``model.layers.3.self_attn.k_proj.ia3_kv.ia3_l``;
* ``recipe.yaml`` – the resolved recipe (every default written out), which re-creates the same sites;
* ``manifest.json`` – graftr/torch/transformers versions, the base model id, class and config, and the tensor list.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from graftr.errors import AdapterLoadError, GraftrError
from graftr.formats.files import check_fit, read_json_object, read_safetensors, real_tensors, write_dir_atomically

FORMAT = "graftr-adapter"
FORMAT_VERSION = 1
TENSORS, RECIPE, MANIFEST = "adapter.safetensors", "recipe.yaml", "manifest.json"
ADAPTER = "adapter"  # graftr train writes RUN_DIR/adapter


def adapter_dir(path) -> Path:
    """``path``, or ``path/adapter`` when ``path`` is a run directory of ``graftr train`` (its adapter inside)."""
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / ADAPTER / MANIFEST).is_file():
        return path / ADAPTER
    return path


def base_reference(model_id: str | None) -> str | None:
    """What an adapter records as its base: the absolute path of a local model (so the adapter works from any
    directory, and after its run directory moves), else the hub id."""
    if model_id is None:
        return None
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def _user_modules(recipe) -> dict[str, Path]:
    """The recipe's ``imports:`` that are single module files outside any installed location (a ``my_kinds.py``
    beside the recipe), by file name: they are copied next to the adapter, which imports them from there."""
    import sys
    import sysconfig

    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    found = {}
    for name in recipe.imports:
        module = sys.modules.get(name)
        file = Path(getattr(module, "__file__", None) or "")
        if "." in name or file.suffix != ".py" or file.name == "__init__.py" or not file.is_file():
            continue  # a package (installed or on the path) is imported as it is
        if any(parent in installed for parent in file.resolve().parents):
            continue
        found[file.name] = file
    return found
# config fields that must agree between the base an adapter was made on and the one it is loaded onto
_STRUCTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "d_model", "num_layers", "n_embd", "n_layer", "n_head")


def _versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in ("graftr", "torch", "transformers")}


def save_adapter(gm, out_dir, *, adapter: str | None = None, extra: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, force: bool = False) -> Path:
    """Save the tensors, resolved recipe and manifest of ``gm``'s adapter ``adapter`` (default: its only one) to
    ``out_dir`` (atomically). A named adapter is written as it would be alone: its tensors under their plain names
    (:func:`graftr.named.plain_name`), an ordinary adapter directory.

    ``tensors`` replaces the values read from ``gm`` (same names and shapes, the model's names): the training loop
    passes the full fp32 tensors it gathered from DeepSpeed, whose module parameters may be ZeRO-3 partitions or
    bf16 copies.
    """
    from graftr.named import named, plain_name
    from graftr.recipe import dump_recipe

    if not gm.grafting.adapters:
        raise GraftrError("the model has no adapters to save")
    if adapter is None:
        if len(gm.grafting.adapters) > 1:
            raise GraftrError(f"the model holds the adapters {', '.join(gm.grafting.adapters)}; name the one to save")
        adapter = next(iter(gm.grafting.adapters))
    recipe = named(gm, adapter).recipe
    state = gm.adapter_state_dict(adapter)
    if tensors is not None:
        if sorted(tensors) != sorted(state):
            raise GraftrError(f"the tensors to save are not the adapter's tensors "
                              f"({len(tensors)} given, {len(state)} in adapter {adapter!r})")
        state = tensors
    tensors = real_tensors({plain_name(n, adapter): t for n, t in state.items()},
                           lambda name: f"cannot save {name}: the base model was built without weights; "
                           "load real weights to save trainable base modules")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "base_model": base_reference(gm.model_id), "base_class": gm.hf_class, "task": gm.task,
        "base_config": gm.hf_config.to_dict(),
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()},
        **(extra or {}),
    }

    modules = _user_modules(recipe)

    def write(tmp: Path) -> None:
        for name, file in modules.items():  # a user kind's module travels with the adapter
            shutil.copyfile(file, tmp / name)
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / RECIPE).write_text(dump_recipe(recipe))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    write_dir_atomically(Path(out_dir), write, marker=MANIFEST, force=force)
    return Path(out_dir)


# what a manifest's fields must be (JSON types); anything else there is damage or hand-editing
_MANIFEST_TYPES = {"format": str, "format_version": int, "versions": dict, "base_model": (str, type(None)),
                   "base_class": (str, type(None)), "task": (str, type(None)), "base_config": dict, "tensors": dict,
                   "training": dict}


def read_manifest(path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise AdapterLoadError(f"{path} is not a graftr adapter directory (no {MANIFEST})")
    manifest = read_json_object(file)
    if manifest.get("format") != FORMAT:
        raise AdapterLoadError(f"{file} is not a graftr adapter manifest")
    for key, types in _MANIFEST_TYPES.items():
        value = manifest.get(key)
        if key in manifest and (not isinstance(value, types) or isinstance(value, bool)):
            raise AdapterLoadError(f"{file}: {key} is a {type(value).__name__} ({json.dumps(value)[:40]}); the "
                                   "manifest is damaged")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{path} was written by a newer graftr (format {manifest['format_version']})")
    id2label = manifest.get("base_config", {}).get("id2label")
    if id2label is not None and (not isinstance(id2label, dict) or not all(str(k).isdigit() for k in id2label)):
        raise AdapterLoadError(f"{file}: base_config.id2label must map label numbers to names; the manifest is "
                               "damaged")
    return manifest


def check_base(manifest: dict, config, where: str) -> None:
    """Refuse an adapter made for a base with a different structure."""
    saved = manifest.get("base_config") or {}
    current = config.to_dict()
    diffs = [f"{k}: adapter {saved[k]} vs model {current.get(k)}" for k in _STRUCTURE_FIELDS
             if k in saved and saved[k] != current.get(k)]
    if diffs:
        raise AdapterLoadError(f"{where} was made for a different base model ({manifest.get('base_model')}): "
                               + "; ".join(diffs))


def check_made_for(manifest: dict, config, where: str, model_id: str) -> None:
    """Refuse, before any weight is read, an adapter made for another model family, then any structure difference
    (:func:`check_base`); ``model_id`` names the base the user chose."""
    made_for = (manifest.get("base_config") or {}).get("model_type")
    if made_for != config.model_type:
        raise AdapterLoadError(f"{where} was made for a {made_for} model ({manifest.get('base_model')}), but "
                               f"{model_id} is a {config.model_type} model")
    check_base(manifest, config, where)


def load_state_into(gm, tensors: dict[str, torch.Tensor], where: str, *, adapter: str | None = None) -> None:
    """Copy ``tensors`` into ``gm``'s trainable parameters, or with ``adapter`` into that adapter's, ``tensors``
    then named as the adapter saved alone names them; every one must be present with the right shape."""
    from graftr.materialize import replace_parameter
    from graftr.named import plain_name

    if adapter is None:
        expected = gm.adapter_state_dict()
    else:
        expected = {plain_name(n, adapter): p for n, p in gm.adapter_state_dict(adapter).items()}
    check_fit({n: p.shape for n, p in expected.items()}, {n: t.shape for n, t in tensors.items()}, where=where,
              target="the model")
    with torch.no_grad():
        for name, param in expected.items():
            src = tensors[name]
            if param.is_meta:
                replace_parameter(gm, param, src.to(param.dtype))
            else:
                param.copy_(src.to(dtype=param.dtype, device=param.device))


def load_adapter(model, path, *, round_trip: bool = False, trust_code: bool = False, adapter_name: str = "default",
                 cls=None):
    """Graft ``model`` with the graftr adapter's recipe as the adapter ``adapter_name`` and load its tensors.
    Returns the :class:`GraftedModel` (a model traced here is a ``cls``, see :func:`graftr.grafted.prepare`).
    ``round_trip``: see :func:`graftr.graft` (a quantizing recipe's base kept dense, for merging).
    ``trust_code``: import the user kind modules saved beside the adapter (its recipe's ``imports:``); without it
    an adapter directory is data and only installed modules are imported.

    (:func:`graftr.load_adapter` also takes PEFT adapter directories: see :mod:`graftr.formats`.)"""
    from graftr.grafted import GraftedModel, graft
    from graftr.recipe import load_recipe

    path = adapter_dir(path)
    manifest = read_manifest(path)
    for f in (TENSORS, RECIPE):
        if not (path / f).is_file():
            raise AdapterLoadError(f"{path} is incomplete: {f} is missing")
    check_base(manifest, model.hf_config if isinstance(model, GraftedModel) else model.config, str(path))
    recipe = load_recipe(path / RECIPE, local_imports=trust_code)  # data: no code from beside it, unless trusted
    gm = graft(model, recipe, model_id=manifest.get("base_model"), round_trip=round_trip, adapter_name=adapter_name,
               cls=cls)
    load_state_into(gm, read_safetensors(path / TENSORS), str(path), adapter=adapter_name)
    return gm
