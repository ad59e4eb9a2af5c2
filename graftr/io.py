"""Saving and loading adapters.

An adapter directory holds three files, written atomically (a temporary sibling directory renamed into place, so
a crash never leaves a half-written adapter and never destroys the previous one):

* ``adapter.safetensors`` – every trainable tensor (adapter parameters and the recipe's trainable modules) under
  its full parameter name, e.g. ``model.layers.3.self_attn.k_proj.ia3_kv.ia3_l``;
* ``recipe.yaml`` – the resolved recipe (every default written out), which re-creates the same sites;
* ``manifest.json`` – graftr/torch/transformers versions, the base model id, class and config, and the tensor list.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graftr.errors import AdapterLoadError, GraftrError

FORMAT = "graftr-adapter"
FORMAT_VERSION = 1
TENSORS, RECIPE, MANIFEST = "adapter.safetensors", "recipe.yaml", "manifest.json"
# config fields that must agree between the base an adapter was made on and the one it is loaded onto
_STRUCTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "d_model", "num_layers", "n_embd", "n_layer", "n_head")


def _versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in ("graftr", "torch", "transformers")}


def write_dir_atomically(out: Path, write, *, marker: str = MANIFEST) -> None:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``out``, replacing ``out`` only if it holds ``marker``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise GraftrError(f"{out} exists and is not a graftr output directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(gm, out_dir, *, extra: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``gm``'s trainable tensors, resolved recipe and manifest to ``out_dir`` (atomically).

    ``tensors`` replaces the values read from ``gm`` (same names and shapes): the training loop passes the full fp32
    tensors it gathered from DeepSpeed, whose module parameters may be ZeRO-3 partitions or bf16 copies.
    """
    from graftr.recipe import dump_recipe

    if gm.recipe is None:
        raise GraftrError("the model has no adapters to save")
    state = gm.adapter_state_dict()
    if tensors is not None:
        if sorted(tensors) != sorted(state):
            raise GraftrError(f"the tensors to save are not the model's trainable tensors "
                              f"({len(tensors)} given, {len(state)} trainable)")
        state = tensors
    on_meta = [n for n, t in state.items() if t.is_meta]
    if on_meta:
        raise GraftrError(f"cannot save {on_meta[0]}: the base model was built without weights; load real weights "
                          "to save trainable base modules")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in state.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "base_model": gm.model_id, "base_class": gm.hf_class, "task": gm.task,
        "base_config": gm.hf_config.to_dict(),
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()},
        **(extra or {}),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / RECIPE).write_text(dump_recipe(gm.recipe))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    write_dir_atomically(Path(out_dir), write)
    return Path(out_dir)


def read_manifest(path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise AdapterLoadError(f"{path} is not a graftr adapter directory (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise AdapterLoadError(f"{path / MANIFEST} is not a graftr adapter manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{path} was written by a newer graftr (format {manifest['format_version']})")
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


def load_state_into(gm, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``gm``'s trainable parameters; every one must be present with the right shape."""
    expected = gm.adapter_state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [f"{n} {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in expected.items()
              if n in tensors and tuple(tensors[n].shape) != tuple(p.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise AdapterLoadError(f"{where} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in expected.items():
            src = tensors[name]
            if param.is_meta:
                _materialize(gm, param, src.to(param.dtype))
            else:
                param.copy_(src.to(dtype=param.dtype, device=param.device))


def _materialize(gm, param, value: torch.Tensor) -> None:
    """Replace a meta parameter by a real one under every name it is registered as (``param.data = value`` refuses
    meta → cpu, and tracing leaves weak references that forbid ``torch.utils.swap_tensors``)."""
    new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        if p is param:
            owner, _, attr = name.rpartition(".")
            gm.get_submodule(owner)._parameters[attr] = new


def load_adapter(model, path):
    """Graft ``model`` with the adapter's recipe and load its tensors. Returns the :class:`GraftedModel`.

    ``path`` is a graftr adapter directory, or an HF PEFT adapter directory (``adapter_config.json``, no manifest),
    which :func:`graftr.peft_format.import_peft` translates."""
    from graftr.grafted import GraftedModel, graft
    from graftr.peft_format import import_peft, peft_adapter_config
    from graftr.recipe import load_recipe

    path = Path(path)
    if peft_adapter_config(path) is not None:
        return import_peft(model, path)
    manifest = read_manifest(path)
    for f in (TENSORS, RECIPE):
        if not (path / f).is_file():
            raise AdapterLoadError(f"{path} is incomplete: {f} is missing")
    check_base(manifest, model.hf_config if isinstance(model, GraftedModel) else model.config, str(path))
    recipe = load_recipe(path / RECIPE)
    gm = graft(model, recipe, model_id=manifest.get("base_model"))
    load_state_into(gm, load_file(str(path / TENSORS)), str(path))
    return gm
