"""HF PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``import_peft(model, dir)`` turns a PEFT adapter into a grafted model (a recipe equivalent to the config, with the
tensors loaded); ``export_peft(gm, dir)`` writes a grafted model in the same published format. Each PEFT type has
one importer and each graftr kind one exporter (``_IMPORTERS``, ``_EXPORTERS``); they share the helpers below:
reading the files, PEFT's module-name matching, ``modules_to_save``, and the checked key mapping.

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
import math
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from graftr.errors import AdapterLoadError, GraftrError
from graftr.grafted import GraftedModel, graft, prepare
from graftr.formats.files import check_fit, read_json_object, real_tensors, write_dir_atomically
from graftr.formats.graftr import MANIFEST, load_state_into
from graftr.names import CLASSIFICATION_TASKS
from graftr.registry import get_kind

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
def import_peft(model, path) -> GraftedModel:
    """Graft ``model`` (an HF model, or a :func:`graftr.prepare`-d one) as the PEFT adapter in ``path`` says, and
    load its tensors. Every tensor must map to a parameter of the right shape, and every parameter must get one."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    config = _read_config(path)
    importer = _IMPORTERS.get(config.get("peft_type"))
    if importer is None:
        raise GraftrError(f"{path / CONFIG}: PEFT type {config.get('peft_type')!r} cannot be imported; graftr reads "
                          f"{', '.join(sorted(_IMPORTERS))}")
    if isinstance(model, GraftedModel) and model.recipe is not None:
        raise GraftrError("import_peft needs the base model (or a prepared one), not a model that is already grafted")
    return importer(model, config, _read_tensors(path), str(path))


def export_peft(gm: GraftedModel, out_dir) -> Path:
    """Write ``gm``'s adapters in PEFT's format to ``out_dir`` (atomically). All adapters must be of one kind that
    has a PEFT equivalent: ``ina`` → LoRA (+ ``lora_inhibition``), ``ia3`` → IA3, ``gated_prompt`` →
    AdaptionPrompt (each exporter refuses, with the reason, what PEFT's type cannot express)."""
    kinds = sorted({plan.rule.adapter.kind for plan in gm.plans})
    for kind in kinds:  # a kind that says why PEFT cannot hold it
        if (reason := getattr(get_kind(kind).module_cls, "peft_refusal", None)) is not None:
            raise GraftrError(reason)
    if len(kinds) != 1 or kinds[0] not in _EXPORTERS:
        have = ", ".join(kinds) or "no adapters"
        raise GraftrError(f"PEFT export needs adapters of one kind among {', '.join(sorted(_EXPORTERS))}; "
                          f"this model has {have}")
    config, tensors = _EXPORTERS[kinds[0]](gm)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_dir_atomically(Path(out_dir), write, marker=CONFIG)
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
    if config.get("peft_type") == "LORA":
        return [_lora_adapter(config)]
    kind = {"IA3": "ia3", "ADAPTION_PROMPT": "gated_prompt"}.get(config.get("peft_type"))
    return [{"kind": kind}] if kind else []


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


def _check_options(config: dict, known: set[str], refused: dict[str, str], where: str) -> None:
    """Refuse every field that is set (not None/False/"none"/empty) and is neither ``known`` nor bookkeeping:
    ``refused`` says why for the options PEFT documents; an unknown field is refused alike."""
    for key, value in config.items():
        if key in known or key in _BOOKKEEPING or value in _OFF or value == {} or value == []:
            continue
        what = refused.get(key)
        reason = f"{what} is not supported" if what else "graftr does not know this option, so it cannot honour it"
        raise GraftrError(f"{where}: PEFT option {key}={json.dumps(value)}: {reason}; refusing to import the adapter "
                          "rather than silently run a different model")


def _peft_selects(spec, name: str) -> bool:
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


def _modules_to_save(config: dict, module_names: list[str]) -> list[str]:
    """Module paths PEFT trains and saves whole: ``modules_to_save`` (plus the head for classification tasks, as
    PEFT adds it), matched on whole trailing components. An entry matching nothing is skipped, as in PEFT."""
    listed = list(config.get("modules_to_save") or [])
    if config.get("task_type") in _HEAD_TASK_TYPES:
        listed += [h for h in _HEAD_NAMES if h not in listed]
    found = [n for n in module_names if _peft_selects(listed, n)]
    return [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]


def _trainable_module_paths(gm: GraftedModel) -> list[str]:
    """The outermost modules selected by the recipe's ``trainable_modules`` (PEFT's ``modules_to_save``)."""
    from graftr.selectors import compile_glob

    globs = [compile_glob(g) for g in gm.recipe.trainable_modules]
    found = [n for n, _ in gm.named_modules() if n and any(rx.fullmatch(n) for rx in globs)]
    return [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]


def _prepare_for_import(model, config: dict) -> tuple[GraftedModel, list[str]]:
    """The prepared base (task from ``task_type``, id from ``base_model_name_or_path``) and its modules_to_save."""
    model_id = config.get("base_model_name_or_path")
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id,
                                                               task=FROM_TASK_TYPE.get(config.get("task_type")))
    return gm, _modules_to_save(config, [n for n, _ in gm.named_modules() if n])


def _recipe_data(gm: GraftedModel, config: dict, where: str, saved: list[str], rules: list[dict]) -> dict:
    return {
        "name": f"peft_{str(config['peft_type']).lower()}",
        "description": f"imported from the PEFT adapter {where}",
        "model": config.get("base_model_name_or_path"),
        "task": gm.task,
        "num_labels": gm.hf_config.num_labels if gm.task in CLASSIFICATION_TASKS else None,
        "trainable_modules": saved,
        "rules": rules,
    }


def _peft_targets(model, gm: GraftedModel, config: dict, saved: list[str], where: str) -> set[str]:
    """The module paths PEFT would adapt (``check_target_module_exists``), all of which must be linear sites."""
    spec = config.get("target_modules")
    if not spec:
        raise GraftrError(f"{where}: target_modules is empty")
    sites = {s.path for s in gm.site_index.linear}
    excluded = config.get("exclude_modules") or []
    names = [n for n, _ in gm.named_modules() if n and not _peft_selects(excluded, n)
             and not any(n == m or n.startswith(f"{m}.") for m in saved)]
    if isinstance(spec, str) and spec.lower() == "all-linear":  # PEFT: every linear layer but the output layer
        if not hasattr(model, "get_output_embeddings"):
            raise GraftrError(f"{where}: target_modules 'all-linear' needs the HF model (to leave out its output "
                              "layer), not a prepared one")
        head = model.get_output_embeddings()
        if head is None and config.get("task_type") == "SEQ_CLS":
            head = next((getattr(model, h) for h in _HEAD_NAMES if hasattr(model, h)), None)
        skip = {n for n, m in model.named_modules() if m is head}
        return {n for n in names if n in sites and n not in skip}
    selected = {n for n in names if _peft_selects(spec, n)}
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


def _as_path_match(selected: set[str], gm: GraftedModel, candidates: list[dict], sites=None) -> dict:
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


def _peft_match(config: dict, selected: set[str], saved: list[str], gm: GraftedModel, names=None) -> dict:
    """A linear rule's ``match``: PEFT's own names (``names``, default ``target_modules``) as ``**.<name>`` globs,
    with ``layers_to_transform`` and ``exclude_modules``, when they select exactly the same sites."""
    spec, excluded = config.get("target_modules"), config.get("exclude_modules") or []
    if not isinstance(spec, list) or isinstance(excluded, str):
        return _as_path_match(selected, gm, [])
    match: dict = {"path": [f"**.{t}" for t in (spec if names is None else names)]}
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        match["layers"] = {"indices": [layers] if isinstance(layers, int) else sorted(layers)}
    if excluded:
        match["exclude"] = [f"**.{e}" for e in excluded]
    # PEFT never adapts a module inside modules_to_save; say so only where it changes the selection
    inside_saved = [g for m in saved for g in (m, f"{m}.**")]
    return _as_path_match(selected, gm, [match, {**match, "exclude": match.get("exclude", []) + inside_saved}])


def _peft_keys(gm: GraftedModel, suffix: str = "", rename: dict[str, str] | None = None) -> dict[str, str]:
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


def _checked_tensors(gm: GraftedModel, tensors: dict, peft_key_of: dict[str, str], where: str,
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


def _real_state(gm: GraftedModel) -> dict[str, torch.Tensor]:
    """The trainable tensors to export, refusing any without data."""
    return real_tensors(gm.adapter_state_dict(), lambda name: f"cannot export {name}: it has no data (the base was "
                        "built on the meta device); load real weights or an adapter first")


def _one_adapter_per_site(gm: GraftedModel, what: str) -> list:
    sites = [site for plan in gm.plans for site in plan.sites]
    paths = [site.path for site in sites]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise GraftrError(f"{twice} has two {gm.plans[0].rule.adapter.kind} adapters; PEFT's format holds one "
                          f"{what} per module")
    return sites


def _modules_outside(gm: GraftedModel, saved: list[str]) -> list[str]:
    """The module names PEFT's target matching would see: the base model's, outside ``modules_to_save``."""
    adapter_modules = [t for plan in gm.plans for t in plan.targets]
    return [n for n, _ in gm.named_modules()
            if n and not any(n == a or n.startswith(f"{a}.") for a in adapter_modules)
            and not any(n == m or n.startswith(f"{m}.") for m in saved)]


def _saved_outside(gm: GraftedModel, paths: list[str]) -> list[str]:
    """The trainable modules (PEFT's ``modules_to_save``), refusing an adapter inside one."""
    saved = _trainable_module_paths(gm)
    inside = [p for p in paths if any(p.startswith(f"{m}.") for m in saved)]
    if inside:
        raise GraftrError(f"{inside[0]} is adapted inside a trainable module; PEFT cannot save both")
    return saved


def _build_recipe(data: dict, where: str):
    from graftr.recipe import recipe_model

    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise GraftrError(f"{where}: the adapter has no graftr equivalent: {field}: {error['msg']}") from None


# ---- LoRA (graftr kind `ina`) ------------------------------------------------------------------------------------
# adapter_config.json fields import reads, or ignores because they do not change the model
_LORA_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
               "lora_inhibition", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "megatron_core",
               # the site knows its weight layout; lora_A/lora_B have the same shapes either way
               "fan_in_fan_out",
               # these only choose how the adapter was initialised or tied before training
               "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
               "qalora_group_size", "ensure_weight_tying", "runtime_config"}
# options that change the model: refused unless off (None/False/empty/"none"); unknown fields are treated alike
_LORA_REFUSED = {
    "use_dora": "DoRA (a magnitude vector per module)", "use_rslora": "rsLoRA scaling alpha/sqrt(r)",
    "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas", "bias": "trained base biases",
    "lora_bias": "a bias on lora_B", "layer_replication": "replicated layers", "megatron_config": "Megatron layers",
    "trainable_token_indices": "trainable embedding rows", "target_parameters": "LoRA on raw parameters",
    "use_qalora": "QALoRA", "alora_invocation_tokens": "activated LoRA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


def _lora_adapter(config: dict) -> dict:
    inhibition = config.get("lora_inhibition")
    return {"kind": "ina", "rank": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout", 0.0), "inhibition": 0.0 if inhibition is None else inhibition}


def _import_lora(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    _check_options(config, _LORA_KNOWN, _LORA_REFUSED, where)
    gm, saved = _prepare_for_import(model, config)
    selected = _peft_targets(model, gm, config, saved, where)
    rules = [{"name": "ina", "match": _peft_match(config, selected, saved, gm), "adapter": _lora_adapter(config)}]
    recipe = _build_recipe(_recipe_data(gm, config, where, saved, rules), where)
    gm = graft(gm, recipe, model_id=config.get("base_model_name_or_path"))
    load_state_into(gm, _checked_tensors(gm, tensors, _peft_keys(gm, ".weight"), where), where)
    return gm


def _export_lora(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    configs = {plan.rule.adapter for plan in gm.plans}
    if len(configs) != 1:
        rules = ", ".join(f"{p.name}: {p.rule.adapter.model_dump(exclude={'kind'})}" for p in gm.plans)
        raise GraftrError(f"a PEFT LoRA adapter has one config for all modules; these rules differ ({rules})")
    cfg = configs.pop()
    if cfg.inhibition > 0 and cfg.activation != "leaky_relu":
        raise GraftrError(f"the published InA format has no activation field and its code always applies "
                          f"leaky_relu; an adapter trained with activation {cfg.activation!r} cannot be exported")
    sites = _one_adapter_per_site(gm, "LoRA")
    paths = [site.path for site in sites]
    saved = _saved_outside(gm, paths)
    state = _real_state(gm)
    keys = _peft_keys(gm, ".weight")
    tensors = {keys[n]: t for n, t in state.items()}
    names = _modules_outside(gm, saved)
    short = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    targets = short if {n for n in names if _peft_selects(short, n)} == set(paths) else paths
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": gm.model_id, "bias": "none",
        "fan_in_fan_out": any(site.layout == "in_out" for site in sites), "inference_mode": True,
        "init_lora_weights": True if cfg.init == "lora" else "gaussian", "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout, "lora_inhibition": cfg.inhibition, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": saved or None, "peft_type": "LORA", "r": cfg.rank,
        "rank_pattern": {}, "revision": None, "target_modules": targets, "task_type": TASK_TYPES.get(gm.task),
        "use_dora": False, "use_rslora": False,
    }
    return config, tensors


# ---- IA3 (graftr kind `ia3`) -------------------------------------------------------------------------------------
# PEFT's IA3 layer (peft/tuners/ia3/layer.py) scales the output, `(W x + b) * l` with l saved as (out, 1), or, for a
# module matching `feedforward_modules`, the input, `W (x * l) + b` with l saved as (1, in); both in the vector's
# dtype cast back to the activation's, exactly graftr's `ia3` with `scale: output` / `scale: input`.
_IA3_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "target_modules", "exclude_modules",
              "feedforward_modules", "modules_to_save",
              # only how the vectors were initialised (ones, or random if False) before training
              "init_ia3_weights",
              # PEFT corrects it per module (Conv1D: True, Linear: False); the vectors are the same either way
              "fan_in_fan_out"}


def _ia3_feedforward(spec, path: str) -> bool:
    """PEFT's feedforward test (``IA3Model._check_target_module_feedforward``): a string is a regex over the whole
    path; a list entry is a plain string suffix, not whole components (``output.dense`` also hits
    ``attention.output.dense``, ``proj`` hits ``down_proj``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(t) for t in spec)


def _import_ia3(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    _check_options(config, _IA3_KNOWN, {}, where)
    ff_spec = config.get("feedforward_modules")
    if ff_spec is None:
        raise GraftrError(f"{where}: feedforward_modules is not set (PEFT would fill in its default for the "
                          "architecture at load time); write it out so graftr knows which modules scale their input")
    gm, saved = _prepare_for_import(model, config)
    selected = _peft_targets(model, gm, config, saved, where)
    feedforward = {p for p in selected if _ia3_feedforward(ff_spec, p)}
    spec = config.get("target_modules")
    rules = []
    for name, scale, group in (("ia3", "output", selected - feedforward), ("ia3_ff", "input", feedforward)):
        if group:
            names = [t for t in spec if any(p == t or p.endswith(f".{t}") for p in group)] \
                if isinstance(spec, list) else None
            rules.append({"name": name, "match": _peft_match(config, group, saved, gm, names),
                          "adapter": {"kind": "ia3", "scale": scale}})
    recipe = _build_recipe(_recipe_data(gm, config, where, saved, rules), where)
    gm = graft(gm, recipe, model_id=config.get("base_model_name_or_path"))
    load_state_into(gm, _checked_tensors(gm, tensors, _peft_keys(gm), where, _ia3_shapes(gm)), where)
    return gm


def _ia3_shapes(gm: GraftedModel) -> dict[str, tuple[int, int]]:
    """PEFT's shapes of the vectors: (out, 1) for output scaling, (1, in) for input scaling."""
    shapes = {}
    for target, module in gm.adapter_modules().items():
        n = module.ia3_l.numel()
        shapes[f"{target}.ia3_l"] = (1, n) if module.position == "input" else (n, 1)
    return shapes


def _ia3_names(paths: list[str], feedforward: set[str], names: list[str]) -> tuple:
    """``target_modules`` and ``feedforward_modules`` with which PEFT adapts exactly ``paths`` (among ``names``) and
    scales the input of exactly ``feedforward``: the fewest trailing path components that do so, with the
    feedforward entries taken from the target entries (PEFT requires a subset); else regexes of the full paths."""
    for depth in range(1, max(p.count(".") for p in paths) + 2):
        targets = list(dict.fromkeys(".".join(p.split(".")[-depth:]) for p in paths))
        if {n for n in names if _peft_selects(targets, n)} != set(paths):
            continue
        ff = [t for t in targets if any(p.endswith(t) for p in feedforward)]
        if {p for p in paths if _ia3_feedforward(ff, p)} == feedforward:
            return targets, ff
    ff_regex = "|".join(re.escape(p) for p in paths if p in feedforward) or "(?!)"  # (?!) matches nothing
    return "|".join(re.escape(p) for p in paths), ff_regex


def _export_ia3(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    sites = _one_adapter_per_site(gm, "IA3 vector")
    paths = [site.path for site in sites]
    saved = _saved_outside(gm, paths)
    state = _real_state(gm)
    shapes, keys = _ia3_shapes(gm), _peft_keys(gm)
    tensors = {keys[n]: t.reshape(shapes[n]) if n in shapes else t for n, t in state.items()}
    feedforward = {site.path for plan in gm.plans for site in plan.sites if plan.rule.adapter.scale == "input"}
    targets, ff = _ia3_names(paths, feedforward, _modules_outside(gm, saved))
    config = {
        "auto_mapping": None, "base_model_name_or_path": gm.model_id, "exclude_modules": None,
        "fan_in_fan_out": any(site.layout == "in_out" for site in sites), "feedforward_modules": ff,
        "inference_mode": True, "init_ia3_weights": True, "modules_to_save": saved or None, "peft_type": "IA3",
        "revision": None, "target_modules": targets, "task_type": TASK_TYPES.get(gm.task),
    }
    return config, tensors


# ---- AdaptionPrompt (graftr kind `gated_prompt`, prompt linear, gate scalar) --------------------------------------
# PEFT's AdaptedAttention (peft/tuners/adaption_prompt/layer.py) on llama/mistral: the prompt (1, L, D) through the
# block's k_proj/v_proj (repeat_interleave'd to the query heads), scores against the query recomputed with RoPE,
# scaled by 1/√head_dim, fp32 softmax, times the scalar `adaption_gate` (no tanh), then o_proj of that branch added
# to the block's output. o_proj(O_tok) + o_proj(branch) = o_proj(O_tok + branch) when o_proj has no bias.
_AP_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "target_modules", "adapter_len", "adapter_layers"}
_AP_MODEL_TYPES = ("llama", "mistral")  # PEFT's TRANSFORMERS_MODEL_CONFIG also has gpt2, a different model (below)
_AP_TARGET = "self_attn"
_AP_NAMES = {"prompt": "adaption_prompt", "gate": "adaption_gate"}
_GPT2_DIFFERENCE = (
    "PEFT's GPT-2 AdaptionPrompt (AdaptedAttentionGPT; o_proj_layer=None in TRANSFORMERS_MODEL_CONFIG) adds the gated "
    "prompt attention gate·softmax(S_p)·V_p to the attention output after c_proj without projecting it through "
    "c_proj, whereas graftr's gated_prompt (LLaMA-Adapter) joins the branch before the output projection, "
    "c_proj(O_tok + gate·softmax(S_p)·V_p); they are different models")


def _ap_sites(gm: GraftedModel, where: str) -> list:
    """The attention blocks PEFT's AdaptionPrompt may prompt, in layer order, after checking that the model is one
    where PEFT computes exactly graftr's gated prompt."""
    cfg, model_type = gm.hf_config, gm.hf_config.model_type
    if model_type == "gpt2":
        raise GraftrError(f"{where}: {_GPT2_DIFFERENCE}; refusing rather than produce a different model")
    if model_type not in _AP_MODEL_TYPES:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt supports only llama, mistral and gpt2 models, not "
                          f"{model_type!r}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.hidden_size != cfg.num_attention_heads * head_dim:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt derives the key/value heads from k_proj's in/out ratio, "
                          f"which assumes hidden_size = heads × head_dim; this model has {cfg.hidden_size} vs "
                          f"{cfg.num_attention_heads} × {head_dim}")
    sites = [s for s in gm.site_index.attention if s.path.endswith(f".{_AP_TARGET}")]
    if not sites:
        raise GraftrError(f"{where}: no attention block named *.{_AP_TARGET} in {gm.hf_class}")
    return sites


def _ap_check_blocks(sites: list, where: str) -> None:
    """PEFT adds o_proj's bias a second time and always scales by 1/√head_dim: refuse blocks where that differs."""
    for site in sites:
        o_proj = site.projections.get("o")
        if o_proj is None:
            raise GraftrError(f"{where}: graftr cannot find the o_proj of {site.path}, so it cannot check that PEFT's "
                              "AdaptionPrompt (which adds o_proj(branch) after o_proj) computes the same model")
        if o_proj.bias is not None:
            raise GraftrError(f"{where}: {o_proj.path} has a bias; PEFT's AdaptionPrompt adds o_proj(branch) after "
                              "o_proj, so it adds the bias twice (a zero gate is then no longer the base model), while "
                              "graftr joins the branch before o_proj; refusing rather than produce a different model")
        if not math.isclose(site.scale, site.head_dim ** -0.5, rel_tol=1e-6):
            raise GraftrError(f"{where}: {site.path} scales its scores by {site.scale:g}, PEFT's AdaptionPrompt "
                              f"always by 1/√head_dim = {site.head_dim ** -0.5:g}")


def _import_adaption_prompt(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    _check_options(config, _AP_KNOWN, {}, where)
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise GraftrError(f"{where}: task_type {config['task_type']!r}: AdaptionPrompt (LLaMA-Adapter) adapters are "
                          "imported for causal language models only")
    length, layers = config.get("adapter_len"), config.get("adapter_layers")
    for key, value in (("adapter_len", length), ("adapter_layers", layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GraftrError(f"{where}: {key} must be a positive integer, not {json.dumps(value)}")
    model_id = config.get("base_model_name_or_path")
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id, task="causal_lm")
    if gm.task != "causal_lm":
        raise GraftrError(f"{where}: an AdaptionPrompt adapter needs a causal_lm model, not {gm.task}")
    sites = _ap_sites(gm, where)
    if (config.get("target_modules") or _AP_TARGET) != _AP_TARGET:
        raise GraftrError(f"{where}: target_modules {config['target_modules']!r}: PEFT's AdaptionPrompt computes the "
                          f"query of a llama/mistral attention module; graftr imports only the default "
                          f"{_AP_TARGET!r}")
    if layers > len(sites):
        raise GraftrError(f"{where}: adapter_layers {layers} is more than the {len(sites)} attention blocks of "
                          f"{gm.hf_class}")
    chosen = sites[-layers:]  # PEFT: the last adapter_layers modules named *.self_attn
    _ap_check_blocks(chosen, where)
    match = _as_path_match({s.path for s in chosen}, gm, [{"op": "attention", "layers": {"last": layers}}],
                           gm.site_index.attention)
    adapter = {"kind": "gated_prompt", "length": length, "prompt": "linear", "gate": "scalar", "mode": "gated"}
    rules = [{"name": "adaption_prompt", "match": match, "adapter": adapter}]
    recipe = _build_recipe({**_recipe_data(gm, config, where, [], rules), "task": "causal_lm"}, where)
    gm = graft(gm, recipe, model_id=model_id)
    shapes = {f"{t}.prompt": (1, length, m.dim) for t, m in gm.adapter_modules().items()}
    load_state_into(gm, _checked_tensors(gm, tensors, _peft_keys(gm, rename=_AP_NAMES), where, shapes), where)
    return gm


def _export_adaption_prompt(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    where = "PEFT AdaptionPrompt export"
    for plan in gm.plans:
        cfg = plan.rule.adapter
        reasons = {
            "mode": f"mode {cfg.mode!r} (prompts joining the tokens' softmax, no gate)",
            "gate": {"per_head_tanh": "gate 'per_head_tanh' (tanh of one gate per head; PEFT has one scalar gate per "
                                      "layer, used without tanh)",
                     "adapt": "gate 'adapt' (a query-dependent gate; PEFT's gate is one learned scalar per layer)"
                     }.get(cfg.gate),
            "prompt": f"prompt {cfg.prompt!r} (PEFT stores each layer's prompt itself, not a network generating it)",
        }
        wanted = {"mode": "gated", "gate": "scalar", "prompt": "linear"}
        for field, value in wanted.items():
            if getattr(cfg, field) != value:
                raise GraftrError(f"{where}: rule {plan.name!r} has {reasons[field]}; PEFT's AdaptionPrompt is "
                                  "gated_prompt with prompt: linear, gate: scalar, mode: gated only")
    lengths = sorted({plan.rule.adapter.length for plan in gm.plans})
    if len(lengths) != 1:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt has one adapter_len for all layers; these rules use "
                          f"{lengths}")
    if gm.task != "causal_lm":
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt is for causal language models; this model is {gm.task}")
    if gm.recipe.trainable_modules:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt saves only the prompts and gates; the trainable modules "
                          f"{gm.recipe.trainable_modules} would be lost")
    candidates = _ap_sites(gm, where)
    sites = _one_adapter_per_site(gm, "adaption prompt")
    paths = {site.path for site in sites}
    if paths != {s.path for s in candidates[-len(paths):]}:
        layers = sorted(s.layer[1] if s.layer else s.path for s in sites)
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt prompts the last adapter_layers attention blocks; this "
                          f"adapter prompts layers {layers} of {len(candidates)}")
    _ap_check_blocks(sites, where)
    state = _real_state(gm)
    keys = _peft_keys(gm, rename=_AP_NAMES)
    prompts = {f"{t}.prompt" for t in gm.adapter_modules()}
    tensors = {keys[n]: t[None] if n in prompts else t for n, t in state.items()}
    config = {
        "adapter_layers": len(paths), "adapter_len": lengths[0], "auto_mapping": None,
        "base_model_name_or_path": gm.model_id, "inference_mode": True, "peft_type": "ADAPTION_PROMPT",
        "revision": None, "target_modules": _AP_TARGET, "task_type": "CAUSAL_LM",
    }
    return config, tensors


_IMPORTERS = {"LORA": _import_lora, "IA3": _import_ia3, "ADAPTION_PROMPT": _import_adaption_prompt}
_EXPORTERS = {"ina": _export_lora, "ia3": _export_ia3, "gated_prompt": _export_adaption_prompt}
