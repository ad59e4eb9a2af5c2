"""HF PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``import_peft(model, dir)`` turns a PEFT adapter into a grafted model (a recipe equivalent to the config, with the
tensors loaded); ``export_peft(gm, dir)`` writes a grafted model in the same published format. The mapping of each
PEFT type belongs to the graftr kind that holds it, in the kind's own file: its adapter class names the PEFT type
(``peft_type``) and implements ``from_peft``/``to_peft`` (and ``peft_adapters``); a kind PEFT cannot hold says why
in ``peft_refusal``. This module is what they share: the entry points, reading the files, PEFT's module-name
matching, ``modules_to_save``, and the checked key mapping.

* ``LORA`` ↔ ``ina``, exactly: ``lora_inhibition`` (the InA paper's extra field, which stock PEFT silently drops)
  is honoured; without it the adapter is plain LoRA (inhibition 0).
* ``IA3`` ↔ ``ia3``, exactly: modules in ``feedforward_modules`` scale their input (``scale: input``), the other
  targets their output (``scale: output``).
* ``ADAPTION_PROMPT`` ↔ ``gated_prompt`` with ``prompt: linear``, ``gate: scalar``, ``mode: gated``, on llama and
  mistral, exactly when ``o_proj`` has no bias (PEFT adds ``o_proj(branch)`` after ``o_proj``: with a bias it adds
  the bias twice). PEFT's GPT-2 path adds the branch after ``c_proj`` without projecting it, a different model.

PEFT options graftr cannot honour (DoRA, rsLoRA, per-module rank/alpha patterns, unknown fields, ...) and graftr
adapters PEFT cannot express are refused with the reason, never dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from graftr.errors import AdapterLoadError, GraftrError
from graftr.grafted import GraftedModel, prepare
from graftr.formats.files import check_fit, read_json_object, real_tensors, write_dir_atomically
from graftr.formats.graftr import MANIFEST
from graftr.names import CLASSIFICATION_TASKS
from graftr import registry
from graftr.registry import kind_of

CONFIG, WEIGHTS, PICKLED_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
FROM_TASK_TYPE = {peft: task for task, peft in TASK_TYPES.items()}  # PEFT task_type → graftr task
_HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")  # PEFT adds the head ("classifier"/"score") to modules_to_save for these
_HEAD_NAMES = ("classifier", "score")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")  # `classifier.modules_to_save.default.weight`
_BOOKKEEPING = {"auto_mapping", "peft_version", "revision", "inference_mode"}  # fields that never change the model
_OFF = (None, False, "none")


# ---- entry points ------------------------------------------------------------------------------------------------
def import_peft(model, path, *, cls=None) -> GraftedModel:
    """Graft ``model`` (an HF model, traced here as a ``cls``, see :func:`graftr.grafted.prepare`; or a
    :func:`graftr.prepare`-d one) as the PEFT adapter in ``path`` says, and load its tensors. Every tensor must map
    to a parameter of the right shape, and every parameter must get one."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    config = _read_config(path)
    importers = _by_peft_type()
    kind = importers.get(config.get("peft_type"))
    if kind is None:
        raise GraftrError(f"{path / CONFIG}: PEFT type {config.get('peft_type')!r} cannot be imported; graftr reads "
                          f"{', '.join(sorted(importers))}")
    if isinstance(model, GraftedModel) and model.grafting.adapters:
        raise GraftrError("import_peft needs the base model (or a prepared one), not a model that is already grafted")
    gm, _ = prepare_for_import(model, config, cls=cls)
    return kind.from_peft(gm, config, _read_tensors(path), str(path))


def import_peft_named(gm: GraftedModel, path, adapter_name: str) -> GraftedModel:
    """Add the PEFT adapter in ``path`` to ``gm`` as the named adapter ``adapter_name`` (:mod:`graftr.named`): it is
    translated on ``gm``'s base built on the meta device (no weights: a second trace, not a copy) into a recipe and
    tensors, which are grafted and loaded like a graftr adapter's."""
    from graftr.formats.graftr import load_state_into
    from graftr.grafted import graft
    from graftr.models import build_model

    if not isinstance(gm, GraftedModel):
        raise GraftrError(f"adapter {adapter_name!r}: a PEFT adapter is loaded under a name into a grafted model")
    num_labels = gm.hf_config.num_labels if gm.task in CLASSIFICATION_TASKS else None
    translated = import_peft(build_model(gm.hf_config, gm.task, device="meta", num_labels=num_labels), path)
    tensors = translated.adapter_state_dict()
    graft(gm, translated.recipe, adapter_name=adapter_name)
    load_state_into(gm, tensors, str(path), adapter=adapter_name)
    return gm


def export_peft(gm: GraftedModel, out_dir, *, force: bool = False) -> Path:
    """Write ``gm``'s adapters in PEFT's format to ``out_dir`` (atomically). All adapters must be of one kind that
    has a PEFT equivalent: ``ina`` → LoRA (+ ``lora_inhibition``), ``ia3`` → IA3, ``gated_prompt`` →
    AdaptionPrompt (each exporter refuses, with the reason, what PEFT's type cannot express)."""
    if len(gm.grafting.adapters) > 1:
        raise GraftrError(f"PEFT's format holds one adapter; this model holds {', '.join(gm.grafting.adapters)}: "
                          "save them (save_pretrained) and export each directory")
    used = {kind.name: kind.module_cls for kind in (kind_of(plan.rule.adapter) for plan in gm.plans)}
    kinds = sorted(used)
    for kind in kinds:  # a kind that says why PEFT cannot hold it
        if (reason := getattr(used[kind], "peft_refusal", None)) is not None:
            raise GraftrError(reason)
    exporters = sorted(k.name for k in registry.kinds().values() if getattr(k.module_cls, "peft_type", None))
    if len(kinds) != 1 or kinds[0] not in exporters:
        have = ", ".join(kinds) or "no adapters"
        raise GraftrError(f"PEFT export needs adapters of one kind among {', '.join(exporters)}; "
                          f"this model has {have}")
    config, tensors = used[kinds[0]].to_peft(gm)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_dir_atomically(Path(out_dir), write, marker=CONFIG, force=force)
    return Path(out_dir)


def peft_adapter_config(path) -> dict | None:
    """The ``adapter_config.json`` of ``path`` if it is a PEFT adapter directory (that file and no graftr
    ``manifest.json``), else None. Cheap: reads one small JSON file."""
    path = Path(path)
    if not (path / CONFIG).is_file() or (path / MANIFEST).exists():
        return None
    return _read_config(path)


def peft_num_labels(path, config: dict) -> int | None:
    """The number of labels of the classification head saved in the PEFT adapter ``path`` (whose ``config`` is
    given): the rows of its output weight (``classifier.out_proj``, ``classifier`` or ``score``), read from the
    safetensors header only; None for other adapters. The base must be built with this many labels for the head to
    load (MNLI's three, not the config's default two)."""
    path = Path(path)
    if config.get("task_type") not in _HEAD_TASK_TYPES or not (path / WEIGHTS).is_file():
        return None
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            shapes = {_SAVED_WRAPPER.sub(".", key).removeprefix(PREFIX): key for key in f.keys()}
            for head in ("classifier.out_proj.weight", "classifier.weight", "score.weight"):
                if head in shapes:
                    return int(f.get_slice(shapes[head]).get_shape()[0])
    except (SafetensorError, OSError):
        return None  # reading the tensors reports it, with the file's name
    return None


def peft_adapters(config: dict) -> list[dict]:
    """The graftr adapters (kind and the options the config alone decides) a PEFT config imports as; for checks
    made before any tensor or weight is read. The import itself validates everything."""
    kind = _by_peft_type().get(config.get("peft_type"))
    return kind.peft_adapters(config) if kind is not None else []


def _by_peft_type() -> dict[str, type]:
    """PEFT type → the adapter module class of the graftr kind that reads and writes it (its ``peft_type``)."""
    return {k.module_cls.peft_type: k.module_cls for k in registry.kinds().values()
            if getattr(k.module_cls, "peft_type", None)}


# ---- shared helpers ----------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    if not (path / CONFIG).is_file():
        raise AdapterLoadError(f"{path} is not a PEFT adapter directory (no {CONFIG})")
    return read_json_object(path / CONFIG)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not (path / WEIGHTS).is_file():
        if (path / PICKLED_WEIGHTS).is_file():
            raise AdapterLoadError(f"{path} holds {PICKLED_WEIGHTS} (a pickle); graftr reads only {WEIGHTS}: convert "
                                   "it, e.g. safetensors.torch.save_file(torch.load(bin, weights_only=True), ...)")
        raise AdapterLoadError(f"{path} is incomplete: {WEIGHTS} is missing")
    try:
        return load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"cannot read {path / WEIGHTS}: {e}") from None


def check_options(config: dict, known: set[str], refused: dict[str, str], where: str) -> None:
    """Refuse every field that is set (not None/False/"none"/empty) and is neither ``known`` nor bookkeeping:
    ``refused`` says why for the options PEFT documents; an unknown field is refused alike."""
    for key, value in config.items():
        if key in known or key in _BOOKKEEPING or value in _OFF or value == {} or value == []:
            continue
        what = refused.get(key)
        reason = f"{what} is not supported" if what else "graftr does not know this option, so it cannot honour it"
        raise GraftrError(f"{where}: PEFT option {key}={json.dumps(value)}: {reason}; refusing to import the adapter "
                          "rather than silently run a different model")


def peft_selects(spec, name: str) -> bool:
    """PEFT's module-name matching: a string is a regex over the whole path; a list entry matches a path equal to
    it or ending in ``.<entry>`` (whole components)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def _layer_index(name: str, layers_pattern) -> int | None:
    """The layer index PEFT reads from a module path for ``layers_to_transform`` (the first numbered component)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(found["idx"]) if found else None


def modules_to_save(config: dict, module_names: list[str]) -> list[str]:
    """Module paths PEFT trains and saves whole: ``modules_to_save`` (plus the head for classification tasks, as
    PEFT adds it), matched on whole trailing components. An entry matching nothing is skipped, as in PEFT."""
    listed = list(config.get("modules_to_save") or [])
    if config.get("task_type") in _HEAD_TASK_TYPES:
        listed += [h for h in _HEAD_NAMES if h not in listed]
    found = [n for n in module_names if peft_selects(listed, n)]
    return [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]


def trainable_module_paths(gm: GraftedModel) -> list[str]:
    """The outermost modules selected by the recipe's ``trainable_modules`` (PEFT's ``modules_to_save``)."""
    from graftr.selectors import compile_glob

    globs = [compile_glob(g) for g in gm.recipe.trainable_modules]
    found = [n for n, _ in gm.named_modules() if n and any(rx.fullmatch(n) for rx in globs)]
    return [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]


def prepare_for_import(model, config: dict, *, cls=None) -> tuple[GraftedModel, list[str]]:
    """The prepared base (task from ``task_type``, id from ``base_model_name_or_path``; traced as a ``cls``) and its
    modules_to_save."""
    model_id = config.get("base_model_name_or_path")
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id, cls=cls,
                                                               task=FROM_TASK_TYPE.get(config.get("task_type")))
    return gm, modules_to_save(config, [n for n, _ in gm.named_modules() if n])


def recipe_data(gm: GraftedModel, config: dict, where: str, saved: list[str], rules: list[dict]) -> dict:
    return {
        "name": f"peft_{str(config['peft_type']).lower()}",
        "description": f"imported from the PEFT adapter {where}",
        "model": config.get("base_model_name_or_path"),
        "task": gm.task,
        "num_labels": gm.hf_config.num_labels if gm.task in CLASSIFICATION_TASKS else None,
        "trainable_modules": saved,
        "rules": rules,
    }


def peft_targets(model, gm: GraftedModel, config: dict, saved: list[str], where: str) -> set[str]:
    """The module paths PEFT would adapt (``check_target_module_exists``), all of which must be linear sites."""
    spec = config.get("target_modules")
    if not spec:
        raise GraftrError(f"{where}: target_modules is empty")
    sites = {s.path for s in gm.site_index.linear}
    excluded = config.get("exclude_modules") or []
    names = [n for n, _ in gm.named_modules() if n and not peft_selects(excluded, n)
             and not any(n == m or n.startswith(f"{m}.") for m in saved)]
    if isinstance(spec, str) and spec.lower() == "all-linear":  # PEFT: every linear layer but the output layer
        head = gm.graftr_embeddings.get("output")  # recorded from the HF model's get_output_embeddings()
        if head is None and config.get("task_type") == "SEQ_CLS":
            head = next((h for h in _HEAD_NAMES if hasattr(gm, h)), None)
        return {n for n in names if n in sites and n != head}
    selected = {n for n in names if peft_selects(spec, n)}
    layers = config.get("layers_to_transform")
    if layers is not None and layers != [] and not isinstance(spec, str):
        wanted = {layers} if isinstance(layers, int) else set(layers)
        selected = {n for n in selected if _layer_index(n, config.get("layers_pattern")) in wanted}
    if not selected:
        raise GraftrError(f"{where}: target_modules {json.dumps(spec)} match no module of {gm.hf_class}")
    not_linear = sorted(selected - sites)
    if not_linear:
        raise GraftrError(f"{where}: target_modules select {not_linear[0]}, which is not a linear layer graftr can "
                          f"adapt ({len(not_linear)} such module(s))")
    return selected


def as_path_match(selected: set[str], gm: GraftedModel, candidates: list[dict], sites=None) -> dict:
    """The first ``match`` among ``candidates`` that selects exactly ``selected`` among ``sites`` (default: the
    linear sites), else a glob per layer-agnostic path (digits → ``*``) if that is exact, else the explicit paths."""
    from graftr.recipe import Match

    sites = gm.site_index.linear if sites is None else sites

    def selects_exactly(match: dict) -> bool:
        try:
            rule = Match.model_validate(match)
            return {s.path for s in sites if rule.accepts(s, gm.site_index.stack_sizes)} == selected
        except (ValidationError, GraftrError):  # a PEFT name that is no valid glob, a layer index out of range
            return False

    ordered = [s.path for s in sites if s.path in selected]
    agnostic = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in ordered))
    for match in [*candidates, {"path": agnostic}]:
        if selects_exactly(match):
            return match
    return {"path": ordered}


def peft_match(config: dict, selected: set[str], saved: list[str], gm: GraftedModel, names=None) -> dict:
    """A linear rule's ``match``: PEFT's own names (``names``, default ``target_modules``) as ``**.<name>`` globs,
    with ``layers_to_transform`` and ``exclude_modules``, when they select exactly the same sites."""
    spec, excluded = config.get("target_modules"), config.get("exclude_modules") or []
    if not isinstance(spec, list) or isinstance(excluded, str):
        return as_path_match(selected, gm, [])
    match: dict = {"path": [f"**.{t}" for t in (spec if names is None else names)]}
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        match["layers"] = {"indices": [layers] if isinstance(layers, int) else sorted(layers)}
    if excluded:
        match["exclude"] = [f"**.{e}" for e in excluded]
    # PEFT never adapts a module inside modules_to_save; say so only where it changes the selection
    inside_saved = [g for m in saved for g in (m, f"{m}.**")]
    return as_path_match(selected, gm, [match, {**match, "exclude": match.get("exclude", []) + inside_saved}])


def peft_keys(gm: GraftedModel, suffix: str = "", rename: dict[str, str] | None = None) -> dict[str, str]:
    """graftr parameter name → PEFT key: ``<site>.<rule>.<param>`` → ``base_model.model.<site>.<param'><suffix>``
    (``param'`` renamed by ``rename``); a trainable base parameter ``classifier.weight`` → ``base_model.model.
    classifier.weight``."""
    site_of = {target: site for plan in gm.plans for site, target in zip(plan.sites, plan.targets)}
    keys = {}
    for name in gm.adapter_state_dict():
        owner, param = name.rsplit(".", 1)
        if owner in site_of:
            keys[name] = f"{PREFIX}{site_of[owner].path}.{(rename or {}).get(param, param)}{suffix}"
        else:
            keys[name] = PREFIX + name
    return keys


def checked_tensors(gm: GraftedModel, tensors: dict, peft_key_of: dict[str, str], where: str,
                     peft_shapes: dict[str, tuple] | None = None) -> dict:
    """Map the file's tensors to ``gm``'s trainable parameters through ``peft_key_of`` (parameter → PEFT key),
    raising :class:`AdapterLoadError` naming every missing, unexpected or mis-shaped PEFT key. ``peft_shapes``
    gives the shape PEFT stores a parameter in where it differs from graftr's (IA³'s ``(out, 1)``); the tensors
    are returned in graftr's shapes."""
    by_key: dict[str, str] = {}
    for key in tensors:  # PEFT saves modules_to_save without their wrapper; accept the wrapped form too
        plain = _SAVED_WRAPPER.sub(".", key)
        if plain in by_key:
            raise AdapterLoadError(f"{where} holds {key} and {by_key[plain]}, two tensors for one parameter")
        by_key[plain] = key
    expected = {key: name for name, key in peft_key_of.items()}
    params = gm.adapter_state_dict()
    want = {key: tuple((peft_shapes or {}).get(expected[key], params[expected[key]].shape)) for key in sorted(expected)}
    check_fit(want, {k: tensors[key].shape for k, key in by_key.items()}, where=where, target=gm.hf_class,
              shown=by_key)
    return {name: tensors[by_key[key]].reshape(params[name].shape) for key, name in expected.items()}


def real_state(gm: GraftedModel) -> dict[str, torch.Tensor]:
    """The trainable tensors to export, refusing any without data."""
    return real_tensors(gm.adapter_state_dict(), lambda name: f"cannot export {name}: it has no data (the base was "
                        "built on the meta device); load real weights or an adapter first")


def one_adapter_per_site(gm: GraftedModel, what: str) -> list:
    sites = [site for plan in gm.plans for site in plan.sites]
    paths = [site.path for site in sites]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise GraftrError(f"{twice} has two {gm.plans[0].rule.adapter.kind} adapters; PEFT's format holds one "
                          f"{what} per module")
    return sites


def modules_outside(gm: GraftedModel, saved: list[str]) -> list[str]:
    """The module names PEFT's target matching would see: the base model's, outside ``modules_to_save``."""
    adapter_modules = [t for plan in gm.plans for t in plan.targets]
    return [n for n, _ in gm.named_modules()
            if n and not any(n == a or n.startswith(f"{a}.") for a in adapter_modules)
            and not any(n == m or n.startswith(f"{m}.") for m in saved)]


def saved_outside(gm: GraftedModel, paths: list[str]) -> list[str]:
    """The trainable modules (PEFT's ``modules_to_save``), refusing an adapter inside one."""
    saved = trainable_module_paths(gm)
    inside = [p for p in paths if any(p.startswith(f"{m}.") for m in saved)]
    if inside:
        raise GraftrError(f"{inside[0]} is adapted inside a trainable module; PEFT cannot save both")
    return saved


def build_recipe(data: dict, where: str):
    from graftr.recipe import recipe_model

    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise GraftrError(f"{where}: the adapter has no graftr equivalent: {field}: {error['msg']}") from None
