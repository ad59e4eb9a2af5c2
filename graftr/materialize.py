"""Load an HF checkpoint's weights straight into a graph traced on the ``meta`` device.

Tracing on ``meta`` costs no weight memory (:func:`build_empty` then :func:`graftr.prepare`/:func:`graftr.graft`);
:func:`materialize` then fills in the graph's parameters and buffers from the ``*.safetensors`` files of a model
directory, one file at a time, without instantiating the HF model with weights. ``safe_open`` maps each tensor
copy-on-write from its file: pages are read when first used, processes on one machine loading the same
checkpoint share them, and peak memory is one copy of the weights (plus the cast copy when ``dtype`` converts).

Names
    The graph keeps the HF names, so a checkpoint key is found as the tensor's own name, or with the model's
    ``base_model_prefix`` removed or added (a ``BertModel`` checkpoint loads into ``BertForSequenceClassification``
    and the other way round), after the renaming ``from_pretrained`` applies to it: transformers' own weight
    renamings for the model (looked up by class name and ``model_type`` for every ``PreTrainedModel`` in it, e.g.
    GPT-NeoX's ``embed_out`` → ``lm_head``) and its legacy ones (``LayerNorm.gamma``/``beta`` → ``weight``/``bias``);
    a key kept as stored when its renamed form names no tensor but the stored one does, as transformers does. A
    key transformers loads through a tensor conversion (Mixture-of-Experts checkpoints: one tensor per expert,
    stacked and concatenated into the fused ``mlp.experts.gate_up_proj``) is collected with the others its target
    needs and converted by transformers' own ``WeightConverter`` operations, one target at a time. Tied tensors (``lm_head.weight`` and ``model.embed_tokens.weight``
    are one ``Parameter``) are loaded once, from whichever of their names the checkpoint has.
What the checkpoint lacks
    is initialised as ``from_pretrained`` does (transformers 5): the owning module is built on CPU from a ``meta``
    twin of the HF model and given to its ``PreTrainedModel._init_weights`` (then each ancestor's, children
    first). Non-persistent buffers (rotary ``inv_freq``, BERT's ``position_ids``) are always computed this way,
    never read from a checkpoint; parameters and persistent buffers that were missing are reported as newly
    initialised (e.g. a fresh classifier on a base checkpoint). Tensors that already hold data and are not in the
    checkpoint (adapters) are left alone.
Device
    ``torch.export`` bakes the tracing device into the graph (``arange(..., device=meta)``, ``to(device)``, device
    assertions); :func:`materialize` re-targets every graph of the model to the CPU with :func:`set_graph_device`,
    which also moves a traced graph to another single device.
dtype
    Floating tensors are cast to ``dtype`` when given, else keep the checkpoint's dtype. The traced graph has its
    dtype baked in (casts, dtype assertions), so the result must equal the dtype the graph was traced in: trace
    with ``build_empty(config, dtype=...)`` in the dtype you load.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import fx, nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

from graftr import quantize
from graftr.errors import GraftrError
from graftr.tensorfile import open_safetensors
from graftr.models import build_model, refuse_pickled_weights

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def build_empty(config, task: str | None = None, *, dtype: torch.dtype | None = None,
                num_labels: int | None = None) -> nn.Module:
    """The HF model for ``config`` on the ``meta`` device (no memory), to trace and then :func:`materialize`.

    ``dtype`` is baked into the traced graph: use the dtype :func:`materialize` will load (fp32 if None).
    """
    return build_model(config, task, device="meta", dtype=dtype, num_labels=num_labels)


def set_graph_device(gm: nn.Module, device: str | torch.device) -> None:
    """Make every device constant in the graphs of ``gm`` (root and outlined layers) ``device``, and recompile."""
    device = torch.device(device)

    def swap(a):
        return device if isinstance(a, torch.device) else a

    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, swap)
                node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
            module.recompile()


@dataclass(eq=False)
class _Entry:
    """One tensor of the graph under all its names (tied tensors have several)."""

    tensor: torch.Tensor
    kind: str  # "parameter" | "buffer"
    names: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]


def _entries(gm: nn.Module) -> list[_Entry]:
    by_id: dict[int, _Entry] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), _Entry(p, "parameter")).names.append(name)
    for name, b in gm.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), _Entry(b, "buffer")).names.append(name)
    return list(by_id.values())


def _stored_keys(directory: Path) -> dict[str, Path]:
    """Every checkpoint key as stored → its file, from the index or the single file."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise GraftrError(f"{directory / INDEX} is not a safetensors index: {e}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and Path(f).name == f and f not in ("", ".", "..") for f in weight_map.values()):
            raise GraftrError(f"{directory / INDEX}: weight_map must map tensor names to file names in {directory}")
        stored = {key: directory / file for key, file in weight_map.items()}
        missing = sorted({str(f) for f in stored.values() if not f.is_file()})
        if missing:
            raise GraftrError(f"{directory / INDEX} lists files that do not exist: {', '.join(missing[:3])}")
    elif (directory / SINGLE).is_file():
        with open_safetensors(directory / SINGLE, error=GraftrError) as f:
            stored = {key: directory / SINGLE for key in f.keys()}
    else:
        refuse_pickled_weights(directory)
        raise GraftrError(f"{directory} has no {SINGLE} or {INDEX} (graftr loads safetensors checkpoints only)")
    return stored


def _checkpoint_keys(stored: dict[str, Path], twin: nn.Module, names: set[str],
                     prefix: str) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple]]:
    """The name each checkpoint key loads as → (file, key as stored), renamed as ``from_pretrained`` renames it; and
    the targets loaded through a tensor conversion → (transformers' ``WeightConverter``, [(file, key, pattern)]).

    The rules are transformers' own for ``twin`` (the HF model, with its ``PreTrainedModel`` sub-models) plus its
    legacy ones, applied by transformers' ``rename_source_key``. As in transformers, a key whose renamed form is
    no tensor of the model (``names``, with or without ``prefix``) but whose stored form is keeps its stored form.
    """
    transforms = get_model_conversion_mapping(twin)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def known(name: str) -> bool:
        return any(c in names for c in _candidates(name, prefix))

    keys: dict[str, tuple[Path, str]] = {}
    converted: dict[str, tuple] = {}
    for key in sorted(stored, key=_natural):
        file = stored[key]
        normal, pattern = rename_source_key(key, renamings, converters)
        if not known(normal) and known(key):
            normal, pattern = key, None
        if pattern is not None and known(normal):
            converter = next(c for c in converters if pattern in c.source_patterns)
            converted.setdefault(normal, (converter, []))[1].append((file, key, pattern))
            continue
        if normal in keys:
            raise GraftrError(f"checkpoint keys {keys[normal][1]} and {key} both load as {normal}")
        keys[normal] = (file, key)
    return keys, converted


def _natural(key: str) -> tuple:
    """Sort key with numbers compared as numbers: expert 10 after expert 9, as transformers stacks them."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def _targets(normal: str, converter) -> list[str]:
    """The names a conversion gives for the target ``normal`` (a one-to-many split gives several)."""
    first = converter.target_patterns[0]
    return [normal.replace(first, t, 1) for t in converter.target_patterns] if first in normal else [normal]


def _convert(normal: str, converter, sources: list[tuple]) -> dict[str, torch.Tensor]:
    """One target's conversion, from its checkpoint tensors (read here), by transformers' own operations:
    {name: tensor} for every name it gives."""
    mapping = copy.deepcopy(converter)
    for file, key, pattern in sources:
        mapping.add_tensor(normal, key, pattern, functools.partial(_read, file, key))
    try:
        out = mapping.convert(normal)
    except Exception as e:  # transformers raises what its ops raise; name the target and the first key
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraftrError(f"{normal}: transformers' conversion of checkpoint key {sources[0][1]} "
                          f"({len(sources)} tensor(s)) failed: {first}") from e
    return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def _read(file: Path, key: str) -> torch.Tensor:
    with open_safetensors(file, error=GraftrError) as f:
        return f.get_tensor(key)


def _candidates(name: str, prefix: str) -> list[str]:
    """The checkpoint keys ``name`` may be stored under: itself, without or with the base model prefix."""
    if not prefix:
        return [name]
    if name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1:]]
    return [name, f"{prefix}.{name}"]


def _hf_class(gm) -> type:
    cls = getattr(transformers, getattr(gm, "hf_class", "") or "", None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise GraftrError(f"materialize needs a model traced from a transformers class (graftr.prepare/graft); "
                          f"{type(gm).__name__} has hf_class={getattr(gm, 'hf_class', None)!r}")
    return cls


def _twin(gm, cls: type) -> nn.Module:
    """The HF model ``gm`` was traced from, rebuilt on ``meta`` (structure, buffer persistence, init functions)."""
    with torch.device("meta"):
        return cls._from_config(copy.deepcopy(gm.hf_config))


def _set(gm: nn.Module, entry: _Entry, value: torch.Tensor) -> None:
    """Make every name of ``entry`` refer to ``value`` (a Parameter keeps its requires_grad flag)."""
    if entry.kind == "parameter":
        value = nn.Parameter(value, requires_grad=entry.tensor.requires_grad)
    for name in entry.names:
        owner, _, local = name.rpartition(".")
        module = gm.get_submodule(owner)
        (module._parameters if entry.kind == "parameter" else module._buffers)[local] = value


def _target_dtype(entry: _Entry, source: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if not source.is_floating_point:
        return entry.tensor.dtype
    target = dtype or source
    if target != entry.tensor.dtype:
        raise GraftrError(f"{entry.name} would be {target} but the graph was traced in {entry.tensor.dtype}; "
                          f"trace with build_empty(config, dtype={target}) or pass dtype={entry.tensor.dtype}")
    return target


def _init_function(twin: nn.Module, path: str):
    """The ``_init_weights`` of the innermost PreTrainedModel containing ``path`` (as transformers dispatches)."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        module = twin.get_submodule(".".join(parts[:i]))
        if isinstance(module, transformers.PreTrainedModel):
            return module._init_weights
    raise GraftrError(f"{path} is not inside a transformers PreTrainedModel")


@torch.no_grad()
def _initialise(twin: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Values for ``names`` made by transformers' init on CPU copies of their owning modules only."""
    owners = sorted({n.rpartition(".")[0] for n in names})
    for owner in owners:
        module = twin.get_submodule(owner)
        module.to_empty(device="cpu", recurse=False)
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and t.is_floating_point():
                t.fill_(math.nan)  # anything init leaves untouched is caught below, not used as garbage
    chain = {".".join(o.split(".")[:i]) if o else "" for o in owners for i in range(len(o.split(".")) + 1)}
    order = [path for path, _ in twin.named_modules(remove_duplicate=False) if path in chain]
    for path in sorted(order, key=lambda p: -(p.count(".") + 1 if p else 0)):  # children before parents
        _init_function(twin, path)(twin.get_submodule(path))
    values = {}
    for name in names:
        owner, _, local = name.rpartition(".")
        module = twin.get_submodule(owner)
        t = module._parameters.get(local, module._buffers.get(local))
        if t.is_floating_point() and torch.isnan(t).any():
            raise GraftrError(f"{name} is not in the checkpoint and {type(module).__name__} has no transformers "
                              "initialisation for it")
        values[name] = t.detach()
    return values


def _load_quantized(gm, file: Path, key: str, spec, dtype: torch.dtype | None) -> None:
    """Read one checkpoint tensor and store it quantized. The file is opened for this tensor alone, so its pages
    leave the process once the tensor is quantized: peak memory is the packed base plus one dense tensor."""
    with open_safetensors(file, error=GraftrError) as f:
        shape = tuple(f.get_slice(key).get_shape())
        if shape != spec.dense_shape:
            raise GraftrError(f"{spec.weight}: the checkpoint's {key} has shape {shape}, the model expects "
                              f"{spec.dense_shape} ({file.name})")
        t = f.get_tensor(key)
    target = dtype or t.dtype
    if target != spec.dtype:
        raise GraftrError(f"{spec.weight} would be {target} but the graph was traced in {spec.dtype}; "
                          f"trace with build_empty(config, dtype={target}) or pass dtype={spec.dtype}")
    quantize.store(gm, spec, t.to(target))


def materialize(gm, directory, *, dtype: torch.dtype | None = None) -> list[str]:
    """Load the weights of the HF model directory ``directory`` into ``gm`` (in place).

    Returns the report: a line listing the tensors newly initialised because the checkpoint lacks them, and one
    listing checkpoint keys that no tensor of the model uses (ignored), when there are any.
    Raises :class:`GraftrError` for a missing checkpoint, a shape mismatch (naming the tensor), a checkpoint key
    transformers would load through a tensor conversion (naming the key) or a dtype that differs from the traced
    one.
    """
    directory = Path(directory)
    cls = _hf_class(gm)
    from graftr.vision import TARGET, load_encoder_weights

    load_encoder_weights(gm, dtype)  # an image encoder (recipe vision:) loads from its own directory
    stored = _stored_keys(directory)
    entries = [e for e in _entries(gm) if not e.name.startswith(f"{TARGET}.encoder.")]
    twin = _twin(gm, cls)
    keys, converted = _checkpoint_keys(stored, twin, {n for e in entries for n in e.names}, cls.base_model_prefix)

    def persistent(entry: _Entry) -> bool:
        owner, _, local = entry.name.rpartition(".")
        return entry.kind == "parameter" or local not in twin.get_submodule(owner)._non_persistent_buffers_set

    used: set[str] = set()
    plan: dict[Path, list[tuple[str, _Entry]]] = defaultdict(list)
    missing: list[_Entry] = []
    # weights the quantize pass stores packed: quantized as they are read, one tensor at a time (graftr.quantize)
    quantized = quantize.stored(gm)
    storage = quantize.storage_names(gm)
    entries = [e for e in entries if not storage.intersection(e.names)]
    for spec in quantized.values():
        found = [c for c in _candidates(spec.weight, cls.base_model_prefix) if c in keys]
        if not found:
            raise GraftrError(f"{spec.weight} is not in the checkpoint in {directory}; a quantized weight must be "
                              "loaded from it (add the module to quantize.skip to initialise it instead)")
        used.update(found)
        file, key = keys[found[0]]
        plan[file].append((key, spec))
    produced = {name: normal for normal, (converter, _) in converted.items() for name in _targets(normal, converter)}
    conversions: dict[str, dict[str, _Entry]] = defaultdict(dict)  # target → {name it gives: entry}
    for entry in entries:
        found = [c for n in entry.names for c in _candidates(n, cls.base_model_prefix) if c in keys]
        through = [c for n in entry.names for c in _candidates(n, cls.base_model_prefix) if c in produced]
        used.update(found + [produced[c] for c in through])
        if persistent(entry) and through and not found:
            conversions[produced[through[0]]][through[0]] = entry
        elif not persistent(entry):
            if entry.tensor.is_meta:
                missing.append(entry)
        elif found:
            file, key = keys[found[0]]
            plan[file].append((key, entry))
        elif entry.tensor.is_meta:
            missing.append(entry)

    for file in sorted(plan):
        with open_safetensors(file, error=GraftrError) as f:
            for key, entry in plan[file]:
                if isinstance(entry, quantize.QuantizedWeight):
                    _load_quantized(gm, file, key, entry, dtype)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(entry.tensor.shape):
                    raise GraftrError(f"{entry.name}: the checkpoint's {key} has shape {shape}, the model expects "
                                      f"{tuple(entry.tensor.shape)} ({file.name})")
                t = f.get_tensor(key)
                _set(gm, entry, t.to(_target_dtype(entry, t.dtype, dtype)))
    for normal, wanted in conversions.items():  # one target at a time (an MoE layer's experts: stacked, concatenated)
        converter, sources = converted[normal]
        out = _convert(normal, converter, sources)
        for name, entry in wanted.items():
            t = out.get(name)
            if t is None:
                raise GraftrError(f"{entry.name}: transformers' conversion of {sources[0][1]} gave {sorted(out)}")
            if tuple(t.shape) != tuple(entry.tensor.shape):
                raise GraftrError(f"{entry.name}: the checkpoint's {sources[0][1]} ({len(sources)} tensor(s)) "
                                  f"converts to shape {tuple(t.shape)}, the model expects {tuple(entry.tensor.shape)}")
            _set(gm, entry, t.to(_target_dtype(entry, t.dtype, dtype)))
        del out

    report = []
    if missing:
        values = _initialise(twin, [e.name for e in missing])
        for entry in missing:  # made in the twin's dtype; cast to the traced one
            # a non-persistent buffer keeps the dtype the model's own code gave it when the graph was traced (Llama's
            # rotary inv_freq is fp32 in a bf16 model, and its forward computes the rotary tables in fp32)
            target = entry.tensor.dtype if not persistent(entry) else _target_dtype(entry, entry.tensor.dtype, dtype)
            _set(gm, entry, values[entry.name].to(target))
        new = sorted(e.name for e in missing if persistent(e))
        if new:
            report.append(f"newly initialized (not in the checkpoint): {', '.join(new)}")
    set_graph_device(gm, "cpu")
    unused = sorted([key for normal, (_, key) in keys.items() if normal not in used]
                    + [key for normal, (_, sources) in converted.items() if normal not in used for _, key, _ in sources])
    if unused:
        report.append(f"unused checkpoint keys: {', '.join(unused)}")
    return report


def replace_parameter(gm: nn.Module, param: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the parameter ``param`` (on ``meta``) by a real one holding ``value`` under every name it has
    (``param.data = value`` refuses meta → cpu, and tracing leaves weak references that forbid
    ``torch.utils.swap_tensors``)."""
    names = [name for name, p in gm.named_parameters(remove_duplicate=False) if p is param]
    _set(gm, _Entry(param, "parameter", names), value)
