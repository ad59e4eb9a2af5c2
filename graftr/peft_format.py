"""HF PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``import_peft(model, dir)`` turns a PEFT adapter into a grafted model (a recipe equivalent to the config, with the
tensors loaded); ``export_peft(gm, dir)`` writes a grafted model in the same published format. Each PEFT type has
one importer and each graftr kind one exporter (``_IMPORTERS``, ``_EXPORTERS``); they share the helpers below:
reading the files, PEFT's module-name matching, ``modules_to_save``, and the checked key mapping.

LoRA-format adapters map to graftr's ``ina`` kind: ``lora_inhibition`` (the extra field of the InA paper's
adapters, which stock PEFT silently drops) is honoured; without it the adapter is plain LoRA (inhibition 0).
PEFT options graftr cannot honour (DoRA, rsLoRA, per-module rank/alpha patterns, ...) are refused, never dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graftr.errors import AdapterLoadError, GraftrError
from graftr.grafted import GraftedModel, graft, prepare
from graftr.io import load_state_into, write_dir_atomically

CONFIG, WEIGHTS, PICKLED_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
_HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")  # PEFT adds the head ("classifier"/"score") to modules_to_save for these
_HEAD_NAMES = ("classifier", "score")
_SAVED_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")  # `classifier.modules_to_save.default.weight`


# ---- entry points ------------------------------------------------------------------------------------------------
def import_peft(model, path) -> GraftedModel:
    """Graft ``model`` (an HF model, or a :func:`graftr.prepare`-d one) as the PEFT adapter in ``path`` says, and
    load its tensors. Every tensor must map to a parameter of the right shape, and every parameter must get one."""
    path = Path(path)
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
    has a PEFT equivalent (``ina`` → LoRA with ``lora_inhibition``)."""
    kinds = sorted({plan.rule.adapter.kind for plan in gm.plans})
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


# ---- shared helpers ----------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    if not (path / CONFIG).is_file():
        raise AdapterLoadError(f"{path} is not a PEFT adapter directory (no {CONFIG})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path / CONFIG} must hold a JSON object")
    return config


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


def _as_path_match(selected: set[str], gm: GraftedModel, candidates: list[dict]) -> dict:
    """The first ``match`` among ``candidates`` that selects exactly ``selected`` linear sites, else a glob per
    layer-agnostic path (digits → ``*``) if that is exact, else the explicit list of paths."""
    from graftr.recipe import Match

    def selects_exactly(match: dict) -> bool:
        try:
            rule = Match.model_validate(match)
            return {s.path for s in gm.site_index.linear if rule.accepts(s, gm.site_index.stack_sizes)} == selected
        except (ValidationError, GraftrError):  # a PEFT name that is no valid glob, a layer index out of range
            return False

    ordered = [s.path for s in gm.site_index.linear if s.path in selected]
    agnostic = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in ordered))
    for match in [*candidates, {"path": agnostic}]:
        if selects_exactly(match):
            return match
    return {"path": ordered}


def _checked_tensors(gm: GraftedModel, tensors: dict, peft_key_of: dict[str, str], where: str) -> dict:
    """Map the file's tensors to ``gm``'s trainable parameters through ``peft_key_of`` (parameter → PEFT key),
    raising :class:`AdapterLoadError` naming every missing, unexpected or mis-shaped PEFT key."""
    by_key: dict[str, str] = {}
    for key in tensors:  # PEFT saves modules_to_save without their wrapper; accept the wrapped form too
        plain = _SAVED_WRAPPER.sub(".", key)
        if plain in by_key:
            raise AdapterLoadError(f"{where} holds {key} and {by_key[plain]}, two tensors for one parameter")
        by_key[plain] = key
    expected = {key: name for name, key in peft_key_of.items()}
    params = gm.adapter_state_dict()
    problems = []
    for label, items in (
        ("missing", sorted(set(expected) - set(by_key))),
        ("unexpected", sorted(by_key[k] for k in set(by_key) - set(expected))),
        ("wrong shape", [f"{by_key[k]} {tuple(tensors[by_key[k]].shape)} vs {tuple(params[expected[k]].shape)}"
                         for k in sorted(set(by_key) & set(expected))
                         if tuple(tensors[by_key[k]].shape) != tuple(params[expected[k]].shape)]),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise AdapterLoadError(f"{where} does not fit {gm.hf_class}: " + "; ".join(problems))
    return {name: tensors[by_key[key]] for key, name in expected.items()}


def _build_recipe(data: dict, where: str):
    from graftr.recipe import recipe_model

    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise GraftrError(f"{where}: the adapter has no graftr equivalent: {field}: {error['msg']}") from None


# ---- LoRA (graftr kind `ina`) ------------------------------------------------------------------------------------
# adapter_config.json fields, by what import does with them
_LORA_USED = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "lora_inhibition",
              "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"}
_LORA_IGNORED = {"auto_mapping", "peft_version", "revision", "inference_mode", "megatron_core", "runtime_config",
                 # the site knows its weight layout; lora_A/lora_B have the same shapes either way
                 "fan_in_fan_out",
                 # these only choose how the adapter was initialised or tied before training
                 "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                 "qalora_group_size", "ensure_weight_tying"}
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
_OFF = (None, False, "none")


def _check_lora_options(config: dict, where: str) -> None:
    for key, value in config.items():
        if key in _LORA_USED or key in _LORA_IGNORED or value in _OFF or value == {} or value == []:
            continue
        what = _LORA_REFUSED.get(key)
        reason = f"{what} is not supported" if what else "graftr does not know this option, so it cannot honour it"
        raise GraftrError(f"{where}: PEFT option {key}={json.dumps(value)}: {reason}; refusing to import the adapter "
                          "rather than silently run a different model")


def _lora_targets(model, gm: GraftedModel, config: dict, saved: list[str], where: str) -> set[str]:
    """The module paths PEFT would put LoRA on (``check_target_module_exists``), all of which must be linear sites."""
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


def _lora_match(config: dict, selected: set[str], saved: list[str], gm: GraftedModel) -> dict:
    """The recipe's ``match``: PEFT's own names as ``**.<name>`` globs when they select exactly the same sites."""
    spec, excluded = config.get("target_modules"), config.get("exclude_modules") or []
    if not isinstance(spec, list) or isinstance(excluded, str):
        return _as_path_match(selected, gm, [])
    match: dict = {"path": [f"**.{t}" for t in spec]}
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        match["layers"] = {"indices": [layers] if isinstance(layers, int) else sorted(layers)}
    if excluded:
        match["exclude"] = [f"**.{e}" for e in excluded]
    # PEFT never adapts a module inside modules_to_save; say so only where it changes the selection
    inside_saved = [g for m in saved for g in (m, f"{m}.**")]
    return _as_path_match(selected, gm, [match, {**match, "exclude": match.get("exclude", []) + inside_saved}])


def _lora_keys(gm: GraftedModel) -> dict[str, str]:
    """graftr parameter name → PEFT key: ``<site>.<rule>.lora_A`` → ``base_model.model.<site>.lora_A.weight``;
    a trainable base parameter ``classifier.weight`` → ``base_model.model.classifier.weight``."""
    site_of = {target: site for plan in gm.plans for site, target in zip(plan.sites, plan.targets)}
    keys = {}
    for name in gm.adapter_state_dict():
        owner, param = name.rsplit(".", 1)
        keys[name] = f"{PREFIX}{site_of[owner].path}.{param}.weight" if owner in site_of else PREFIX + name
    return keys


def _import_lora(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    _check_lora_options(config, where)
    task = {v: k for k, v in TASK_TYPES.items()}.get(config.get("task_type"))
    model_id = config.get("base_model_name_or_path")
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id, task=task)
    saved = _modules_to_save(config, [n for n, _ in gm.named_modules() if n])
    selected = _lora_targets(model, gm, config, saved, where)
    adapter = {"kind": "ina", "rank": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
               "dropout": config.get("lora_dropout", 0.0), "inhibition": config.get("lora_inhibition") or 0.0}
    recipe = _build_recipe({
        "name": "peft_lora",
        "description": f"imported from the PEFT adapter {where}",
        "model": model_id,
        "task": gm.task,
        "num_labels": gm.hf_config.num_labels if gm.task in ("seq_cls", "token_cls") else None,
        "trainable_modules": saved,
        "rules": [{"name": "ina", "match": _lora_match(config, selected, saved, gm), "adapter": adapter}],
    }, where)
    gm = graft(gm, recipe, model_id=model_id)
    load_state_into(gm, _checked_tensors(gm, tensors, _lora_keys(gm), where), where)
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
    sites = [site for plan in gm.plans for site in plan.sites]
    paths = [site.path for site in sites]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise GraftrError(f"{twice} has two ina adapters; PEFT's format holds one LoRA per module")
    saved = _trainable_module_paths(gm)
    inside = [p for p in paths if any(p.startswith(f"{m}.") for m in saved)]
    if inside:
        raise GraftrError(f"{inside[0]} is adapted inside a trainable module; PEFT cannot save both")
    state = gm.adapter_state_dict()
    on_meta = [n for n, t in state.items() if t.is_meta]
    if on_meta:
        raise GraftrError(f"cannot export {on_meta[0]}: it has no data (the base was built on the meta device); "
                          "load real weights or an adapter first")
    keys = _lora_keys(gm)
    tensors = {keys[n]: t.detach().to("cpu").contiguous() for n, t in state.items()}
    adapter_modules = [t for plan in gm.plans for t in plan.targets]
    names = [n for n, _ in gm.named_modules()
             if n and not any(n == a or n.startswith(f"{a}.") for a in adapter_modules)
             and not any(n == m or n.startswith(f"{m}.") for m in saved)]
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


_IMPORTERS = {"LORA": _import_lora}
_EXPORTERS = {"ina": _export_lora}
