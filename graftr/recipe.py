"""The recipe: a YAML file naming where adapters go (``match``) and which ones (``adapter``).

::

    name: ia3_llama
    rules:
      - name: ia3_attn
        match: {path: "model.layers.*.self_attn.{k_proj,v_proj}", layers: {last: 30}}
        adapter: {kind: ia3}

The type of ``adapter`` is the discriminated union over the adapter kinds registered when the recipe is
validated (built-in ones, entry points and the modules in the recipe's ``imports:``). :class:`Rule` and
:class:`Recipe` are therefore the static bases; :func:`recipe_model` builds the validating subclasses for the
current registry. :func:`parse_recipe` reports every problem at once, each with its file, line and field.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      create_model, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from graftr import registry
from graftr.configmodel import Boolean, ConfigModel
from graftr.errors import GraftrError, LayerCountError, MatchError, RecipeError
from graftr.names import Task
from graftr.sections import QuantizeConfig, VisionConfig
from graftr.registry import AdapterConfig
from graftr.selectors import LayerSelect, compile_glob
from graftr.train.config import TrainConfig

_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"  # never a path: no '/', no '.', so never '..'
_MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_glob(pattern: str) -> str:
    compile_glob(pattern)
    return pattern


Glob = Annotated[str, AfterValidator(_check_glob)]
# A glob or a list of globs (OR-ed); always a list once validated.
Globs = Annotated[list[Glob], BeforeValidator(_as_list, json_schema_input_type=str | list[str])]
ClassNames = Annotated[list[Annotated[str, Field(pattern=_IDENTIFIER)]],
                       BeforeValidator(_as_list, json_schema_input_type=str | list[str])]


class Match(ConfigModel):
    """Which sites a rule selects. Every selector given must hold; ``layers`` and ``exclude`` only narrow."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "anyOf": [{"required": ["path"]}, {"required": ["module_class"]}, {"required": ["op"]},
                  {"required": ["role"]}]})

    path: Annotated[Globs, Field(min_length=1)] | None = Field(None, description="module path globs, any may match")
    module_class: Annotated[ClassNames, Field(min_length=1)] | None = Field(
        None, description="module class names (exact), any may match")
    op: Literal["linear", "attention", "experts"] | None = Field(
        None, description="the kind of site (experts: a Mixture-of-Experts layer's fused expert projections)")
    layers: LayerSelect | None = Field(None, description="layers of each stack; sites outside any stack are dropped")
    role: Annotated[ClassNames, Field(min_length=1)] | None = Field(
        None, description="Mixture-of-Experts roles, any may match: an expert site's weight (gate_up_proj, "
                          "down_proj, up_proj) or router")
    experts: LayerSelect | None = Field(
        None, description="which experts of each expert site get parameters (first, last, indices, range, as for "
                          "layers); only expert sites are then selected; the others stay as they are")
    exclude: Globs = Field([], description="module path globs; a site matching any is dropped")

    _path: tuple[re.Pattern[str], ...] = PrivateAttr(())
    _exclude: tuple[re.Pattern[str], ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _has_selector(self) -> Match:
        if self.path is None and self.module_class is None and self.op is None and self.role is None:
            raise ValueError("match needs at least one of path, module_class, op, role (layers, experts and exclude "
                             "only narrow)")
        return self

    def model_post_init(self, context: Any) -> None:
        self._path = tuple(compile_glob(p) for p in self.path or ())
        self._exclude = tuple(compile_glob(p) for p in self.exclude)

    def accepts(self, site: Any, stack_sizes: dict[str, int]) -> bool:
        """Whether ``site`` (with ``path``, ``module_class``, ``op``, ``layer``) is selected.

        ``stack_sizes`` maps each layer-stack prefix to its number of layers. Raises :class:`MatchError` when
        ``layers`` asks for more layers than the site's stack has.
        """
        if self.path is not None and not any(p.match(site.path) for p in self._path):
            return False
        if self.module_class is not None and site.module_class not in self.module_class:
            return False
        if self.op is not None and site.op != self.op:
            return False
        if self.role is not None and getattr(site, "role", None) not in self.role:
            return False
        if any(p.match(site.path) for p in self._exclude):
            return False
        if self.experts is not None:
            if site.op != "experts":
                return False
            try:
                self.experts.resolve(site.num_experts)
            except ValueError as e:
                raise MatchError(f"cannot select experts of {site.path}: {e.args[0].replace('layer', 'expert')}") \
                    from None
        if self.layers is None:
            return True
        if site.layer is None:
            return False
        stack, index = site.layer
        try:
            return index in self.layers.resolve(stack_sizes[stack])
        except ValueError as e:
            raise LayerCountError(f"cannot select layers of {stack!r}: {e}") from None

    def describe(self) -> str:
        """A one-line summary: ``path=model.layers.*.self_attn.{k_proj,v_proj} op=linear layers=last 30``."""
        parts = []
        if self.path is not None:
            parts.append("path=" + "|".join(self.path))
        if self.module_class is not None:
            parts.append("module_class=" + "|".join(self.module_class))
        if self.op is not None:
            parts.append(f"op={self.op}")
        if self.role is not None:
            parts.append("role=" + "|".join(self.role))
        if self.layers is not None:
            parts.append(f"layers={self.layers.describe()}")
        if self.experts is not None:
            parts.append(f"experts={self.experts.describe()}")
        if self.exclude:
            parts.append("exclude=" + "|".join(self.exclude))
        return " ".join(parts)


class Rule(ConfigModel):
    """One rule: the sites it selects and the adapter attached to each. Validate through :func:`recipe_model`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_IDENTIFIER, description="identifier; the adapter's attribute name on each site")
    description: str = ""
    match: Match
    adapter: AdapterConfig = Field(description="adapter config; `kind` picks one of the registered adapter kinds")

    # "recipes/x.yaml:14": where the rule's layers (else the rule) is written, for errors found when matching
    _origin: str | None = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:  # the same rule wherever it was written (not by _origin)
        if not isinstance(other, Rule):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__


class Recipe(ConfigModel):
    """A whole recipe. Validate through :func:`recipe_model` (or :func:`parse_recipe`), which knows the kinds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME, max_length=128, description="a plain name (letters, digits, _ and -): "
                      "`graftr train` writes to runs/<name> without --out")
    description: str = ""
    model: str | None = Field(None, description="default model id or path")
    task: Task | None = Field(None, description="the head to load the model with")
    num_labels: int | None = Field(None, ge=1, description="labels of a seq_cls / token_cls head")
    imports: list[Annotated[str, Field(pattern=_MODULE_NAME)]] = Field(
        [], description="python modules imported before validation (they register user adapter kinds)")
    trainable_modules: Globs = Field([], description="module path globs whose own parameters are trained too")
    vision: VisionConfig | None = Field(None, description="the frozen image encoder whose projected global feature "
                                        "conditions the prompts of gated_prompt rules with condition: image")
    rules: list[Rule] = Field(min_length=1)
    quantize: QuantizeConfig | None = Field(None, description="store the frozen base's linear layers in 4 or 8 "
                                            "bits (bitsandbytes); adapters train on top")
    train: TrainConfig | None = Field(None, description="how `graftr train` trains the adapters")

    @model_validator(mode="after")
    def _quantize_fits_training(self) -> Recipe:
        if self.quantize is None or not self.quantize.enabled or self.train is None:
            return self
        if self.train.zero_stage == 3:
            message = (f"zero_stage 3 cannot train on a quantized base (quantize.method {self.quantize.method}): "
                       "ZeRO-3 partitions every parameter and the packed weights are not DeepSpeed parameters; use "
                       "zero_stage 0-2 (the quantized base is already 4-8x smaller) or quantize.method none")
            raise ValidationError.from_exception_data("Recipe", [InitErrorDetails(
                type=PydanticCustomError("quantize", message), loc=("train", "zero_stage"), input=3)])
        return self

    @model_validator(mode="after")
    def _vision_is_used(self) -> Recipe:
        conditioned = [r.name for r in self.rules if getattr(r.adapter, "condition", "none") == "image"]
        if conditioned and self.vision is None:
            raise ValueError(f"rule {conditioned[0]!r} has condition: image, but the recipe has no vision: section "
                             "naming the image encoder")
        if self.vision is not None and not conditioned:
            raise ValueError("the recipe has a vision: section but no rule uses it (set condition: image on a "
                             "gated_prompt rule)")
        return self

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[Rule]) -> list[Rule]:
        seen: dict[str, int] = {}
        errors = []
        for i, rule in enumerate(rules):
            if rule.name in seen:
                error = PydanticCustomError("duplicate_rule_name", "duplicate rule name '{name}' (also rules[{first}])",
                                            {"name": rule.name, "first": seen[rule.name]})
                errors.append(InitErrorDetails(type=error, loc=(i, "name"), input=rule.name))
            seen.setdefault(rule.name, i)
        if errors:  # pydantic prefixes these with the field's location, giving rules[i].name
            raise ValidationError.from_exception_data("Recipe", errors)
        return rules


@functools.lru_cache(maxsize=1)
def _build_model(version: int) -> type[Recipe]:
    adapter = registry.adapter_union()
    description = Rule.model_fields["adapter"].description
    rule = create_model("Rule", __base__=Rule, __module__=__name__, adapter=(adapter, Field(description=description)))
    return create_model("Recipe", __base__=Recipe, __module__=__name__, rules=(list[rule], Field(min_length=1)))


def recipe_model() -> type[Recipe]:
    """The :class:`Recipe` subclass validating against the adapter kinds registered now."""
    return _build_model(registry.registry_version())


def recipe_json_schema() -> dict:
    """JSON Schema of the current recipe model (for editors)."""
    return recipe_model().model_json_schema()


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text; a missing or unreadable file raises :class:`RecipeError`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                local_imports: bool = True) -> Recipe:
    """Read and validate a recipe file, after ``path.to.field=value`` overrides; every problem raises one
    :class:`RecipeError`. ``local_imports=False`` for the recipe of an adapter directory: its ``imports:`` come
    from installed packages only, never from files beside it (:func:`graftr.registry.import_modules`)."""
    return parse_recipe(read_recipe_text(path), source=str(path), overrides=overrides, local_imports=local_imports)


def _source_dir(source: str) -> list[str]:
    folder = Path(source).parent
    return [str(folder.resolve())] if Path(source).is_file() else []


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off (as it was after). A recipe becomes millions of objects (YAML nodes
    with their marks, the data, the validated models) that hold no reference cycle; the collector would scan them
    again and again as they are made: a 10 MB recipe took 3 times as long to validate."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_collector_paused()
def parse_recipe(text: str, source: str = "<string>", overrides: list[str] | tuple[str, ...] = (), *,
                 local_imports: bool = True) -> Recipe:
    """Validate a recipe's YAML text, after applying ``overrides`` to its mapping and importing its ``imports:``.

    Raises :class:`RecipeError` listing every problem, one per line: ``source:line: location: message`` for values
    from the text, ``override X=Y: location: message`` for values an override set (and ``source:line with override
    X=Y: ...`` for a check of a whole mapping that failed on values overrides set in it).
    """
    root, data = _compose(text, source)
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}:{root.start_mark.line + 1}: a recipe must be a mapping with name and rules, "
                          f"got {type(data).__name__}")
    applied = []
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(data, keys, value, item)
        applied.append((keys, item))

    # (line for sorting, origin, location, message); origin is "file:line" or "override KEY=VALUE"
    problems = [(line, f"{source}:{line}", where, message) for line, where, message in _duplicate_keys(root)]
    imports = data.get("imports")
    for i, module in enumerate(imports if isinstance(imports, list) else []):
        if isinstance(module, str) and re.match(_MODULE_NAME, module):  # else validation reports it
            try:
                registry.import_modules([module], search=_source_dir(source), local=local_imports)
            except GraftrError as e:
                line, where = _locate(root, ("imports", i))
                problems.append((line, f"{source}:{line}", where, str(e)))
    recipe = None
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        for error in e.errors():
            line, where, message = _problem(root, error)
            if not applied:
                problems.append((line, f"{source}:{line}", where, message))
                continue
            loc = _data_loc(tuple(error["loc"]), data)
            by = next((item for keys, item in reversed(applied) if loc[: len(keys)] == keys), None)
            if by is not None:  # the value came from an override: the file's line would point elsewhere
                problems.append((0, f"override {by}", _display(loc), message))
                continue
            # a check of the whole mapping (train: offload needs a zero_stage) may fail on values overrides set in it
            inside = [item for keys, item in applied if keys[: len(loc)] == loc]
            origin = f"{source}:{line}" + (f" with override {' '.join(inside)}" if inside else "")
            problems.append((line, origin, _display(loc), message))
    if problems:
        raise RecipeError("\n".join(f"{origin}: {where}: {message}" for _, origin, where, message in
                                    sorted(problems, key=lambda p: p[0])))
    return remember_origins(recipe, root, source)


def remember_origins(recipe: Recipe, root: yaml.Node, source: str) -> Recipe:
    """Record on each rule the file and line of its ``layers`` (else of the rule), for errors found when matching."""
    for i, rule in enumerate(recipe.rules):
        line, _ = _locate(root, ("rules", i, "match", "layers") if rule.match.layers else ("rules", i))
        rule._origin = f"{source}:{line}"
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the resolved recipe, every default written out; :func:`parse_recipe` reads it back equal."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# libyaml's parser (PyYAML's C loader) reads a 10 MB recipe in about a second; the pure-Python one takes minutes.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# YAML aliases may repeat a part of a recipe; more values than this after expanding them (and more than
# ALIAS_FACTOR times the values written) is an alias bomb that validation would walk for hours.
MAX_EXPANDED_VALUES = 1_000_000
ALIAS_FACTOR = 10


def load_yaml(text: str):
    """A YAML value from ``text`` (an override's value, a data field) with the same safe loader as recipes."""
    return yaml.load(text, Loader=YAML_LOADER)


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree (for line numbers) and the data built from it, in one parse."""
    try:
        loader = YAML_LOADER(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                _check_expansion(root, source)
            return root, loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        context = f" ({e.context})" if e.context and e.problem else ""
        problem = " ".join(str(e.problem or e.context).split())
        raise RecipeError(f"{source}{line}: invalid YAML: {problem}{context}") from None
    except yaml.YAMLError as e:  # the reader's errors carry no line
        raise RecipeError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _walk(root: yaml.Node) -> tuple[int, bool]:
    """How many nodes the tree has (each once: aliases share nodes) and whether one is reached twice (an alias
    refers to it); without recursion (the nesting depth is the input's)."""
    seen, stack, shared = set(), [root], False
    while stack:
        node = stack.pop()
        if id(node) in seen:
            shared = True
            continue
        seen.add(id(node))
        stack += _children(node)
    return len(seen), shared


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases multiply it (each node counted as often as it is reachable), or with an
    alias inside the collection it refers to."""
    count, shared = _walk(root)
    if not shared:  # no alias: the document is its nodes
        return
    size: dict[int, int] = {}  # id → the values a node expands to
    path: set[int] = set()  # the nodes whose children are being sized, from the root down
    stack = [(root, False)]
    while stack:  # depth first; a node is sized once its children are
        node, children_sized = stack.pop()
        if children_sized:
            path.discard(id(node))
            size[id(node)] = min(1 + sum(size[id(child)] for child in _children(node)), 2**62)
        elif id(node) in path:
            raise RecipeError(f"{source}:{node.start_mark.line + 1}: invalid YAML: an alias refers to a "
                              "collection that contains it")
        elif id(node) not in size:
            path.add(id(node))
            stack.append((node, True))
            stack += [(child, False) for child in _children(node)]
    total = size[id(root)]
    if total > MAX_EXPANDED_VALUES and total > ALIAS_FACTOR * count:
        raise RecipeError(f"{source}: invalid YAML: its aliases expand {count:,} values to {total:,}; aliases "
                          "may repeat parts of a recipe, not multiply it")


def _problem(root: yaml.Node, error: dict) -> tuple[int, str, str]:
    """``(line, location, message)`` for one pydantic error."""
    loc, message = tuple(error["loc"]), error["msg"]
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc += ("kind",)
        tag = error["ctx"].get("tag")
        what = f"unknown adapter kind {tag!r}" if tag is not None else "missing adapter kind"
        close = _closest_word(tag, registry.configs())
        what += f" (did you mean {close!r}?)" if close else ""
        message = f"{what}; registered kinds: {', '.join(sorted(registry.configs()))}"
    elif error["type"] == "extra_forbidden":
        close = _closest_word(loc[-1], _keys_at(loc[:-1]))
        message += f"; did you mean {close!r}?" if close else ""
    value = error["input"]
    if isinstance(value, (str, int, float, Boolean)) and error["type"] != "extra_forbidden" and repr(value) not in message:
        message += f", got {value!r}"
    return (*_locate(root, loc), message)


def _closest_word(word: Any, choices) -> str | None:
    """The key or kind a misspelt ``word`` most likely meant (``rnak`` → ``rank``), or None."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _keys_at(loc: tuple) -> list[str]:
    """The keys the recipe model accepts in the mapping at ``loc`` (``("rules", 0, "adapter", "ina")``)."""
    def unwrap(tp: Any) -> Any:
        while True:
            if get_origin(tp) is Annotated:
                tp = get_args(tp)[0]
            elif get_origin(tp) in (Union, types.UnionType):
                members = [a for a in get_args(tp) if a is not type(None)]
                if len(members) != 1:
                    return tp  # a union of adapter configs: the kind tag in the location picks one
                tp = members[0]
            else:
                return tp

    tp: Any = recipe_model()
    for part in loc:
        tp = unwrap(tp)
        if isinstance(part, int) and get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and part in registry.configs():
            tp = registry.configs()[part]
        elif isinstance(tp, type) and issubclass(tp, ConfigModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return []
    tp = unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, ConfigModel) else []


def _locate(root: yaml.Node, loc: tuple) -> tuple[int, str]:
    """The line of ``loc`` in the YAML tree and its display form ``rules[0].adapter.rank``.

    Walks down as far as the tree goes: a missing key is shown but takes its parent's line; the tag a
    discriminated union adds after ``adapter`` is skipped; locations inside a scalar end at the scalar.
    """
    node, line, where = root, root.start_mark.line, ""
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line, where = node.start_mark.line, f"{where}[{part}]"
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        keys = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if str(part) in keys:
            key, node = keys[str(part)]
            line, where = key.start_mark.line, f"{where}.{part}" if where else str(part)
        elif "kind" in keys and keys["kind"][1].value == part:
            continue  # the tag a discriminated union adds to the location
        else:
            where = f"{where}.{part}" if where else str(part)
            break
    return line + 1, where or "(top level)"


def _duplicate_keys(root: yaml.Node):
    """``(line, location, message)`` for every mapping key given twice (PyYAML would keep the last silently)."""
    seen, stack = set(), [(root, "")]
    while stack:  # not recursive: the nesting depth is the input's
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{where}[{i}]") for i, item in reversed(list(enumerate(node.value)))]
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            children = []
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                child = f"{where}.{name}" if where else str(name)
                if name in first_line:
                    yield key.start_mark.line + 1, child, f"duplicate key (first given on line {first_line[name]})"
                first_line.setdefault(name, key.start_mark.line + 1)
                children.append((value, child))
            stack += reversed(children)


# --------------------------------------------------------------------------------------------- overrides

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)$", re.DOTALL)


def parse_override(text: str) -> tuple[tuple[str | int, ...], Any]:
    """``"train.max_steps=20"`` → ``(("train", "max_steps"), 20)``; the value is read as a YAML scalar/flow."""
    m = _OVERRIDE.match(text)
    if m is None:
        raise GraftrError(f"override {text!r} is not path.to.field=value (e.g. train.max_steps=20)")
    path = tuple(int(p) if p.isdigit() else p for p in m.group(1).split("."))
    try:
        value = load_yaml(m.group(2)) if m.group(2).strip() else None
    except yaml.YAMLError as e:
        raise GraftrError(f"override {text!r}: the value is not valid YAML: {str(e).splitlines()[0]}") from None
    return path, value


def apply_override(data: dict, path: tuple[str | int, ...], value: Any, text: str) -> None:
    """Set ``data[path] = value``, creating mappings on the way; list items are addressed by index."""
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        where = ".".join(map(str, path[: depth + 1]))
        if isinstance(node, dict):
            if not isinstance(node.get(part), (dict, list)):
                if part in node and node[part] is not None:
                    raise GraftrError(f"override {text!r}: {where} is {node[part]!r}, not a mapping")
                node[part] = {}
            node = node[part]
        elif isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise GraftrError(f"override {text!r}: {where} is not an index of the list "
                                  f"(it has {len(node)} items)")
            node = node[part]
        else:
            raise GraftrError(f"override {text!r}: {where} cannot be set inside {node!r}")
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not 0 <= last < len(node):
            raise GraftrError(f"override {text!r}: {last} is not an index of the list (it has {len(node)} items)")
    elif not isinstance(node, dict):
        raise GraftrError(f"override {text!r}: cannot set {last} inside {node!r}")
    node[last] = value


def _data_loc(loc: tuple, data: Any) -> tuple:
    """A pydantic error location as a path into ``data``: the adapter-kind tag a discriminated union adds
    (``rules.0.adapter.ia3.rank``) is dropped."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    return tuple(out)


def _has(node: dict | list, part: Any) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def _display(loc: tuple) -> str:
    """``("rules", 0, "adapter", "rank")`` → ``rules[0].adapter.rank``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
