"""Recipe schema, YAML error reporting, globs and layer selection (graftr.recipe, graftr.selectors)."""

from __future__ import annotations

import gc
import json
import textwrap
from types import SimpleNamespace
from typing import Literal

import pytest
import yaml
from pydantic import ValidationError
from torch import nn

from graftr import recipe as recipe_module
from graftr import registry
from graftr.errors import GraftrError, MatchError, RecipeError
from graftr.recipe import Match, Recipe, Rule, dump_recipe, load_recipe, parse_recipe, recipe_json_schema, recipe_model
from graftr.selectors import LayerSelect, compile_glob
from graftr.train.config import TrainConfig


class ScaleConfig(registry.AdapterConfig):
    kind: Literal["test_scale"] = "test_scale"
    rank: int = 8
    init: float = 1.0


class PromptConfig(registry.AdapterConfig):
    kind: Literal["test_prompt"] = "test_prompt"
    length: int = 10


@registry.register_adapter(ScaleConfig, ops=("linear",))
class Scale(nn.Module):
    pass


@registry.register_adapter(PromptConfig, ops=("attention",))
class Prompt(nn.Module):
    pass


def parse(text: str, source: str = "r.yaml") -> Recipe:
    return parse_recipe(textwrap.dedent(text), source)


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse(text)
    return str(e.value).splitlines()


VALID = """\
# graftr apply r.yaml --model tiny
name: demo
model: tiny-llama
task: seq_cls
num_labels: 3
trainable_modules: score
rules:
  - name: scale_kv
    description: scale k and v
    match:
      path: "model.layers.*.self_attn.{k_proj,v_proj}"
      module_class: [Linear, Conv1D]
      op: linear
      layers: {last: 2}
      exclude: "**.lm_head"
    adapter: {kind: test_scale, rank: 4}
  - name: prompt
    match: {op: attention, layers: {range: [0, 2]}}
    adapter: {kind: test_prompt}
train: {lr: 0.001, max_steps: 5, data: {format: classification}}
"""


# --- globs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, path, hit", [
    ("model.layers.0.mlp", "model.layers.0.mlp", True),
    ("model.layers.0.mlp", "model.layers.0.mlp.fc", False),
    ("model.layers.0", "model_layers.0", False),  # dots are literal
    ("model.layers.*.q_proj", "model.layers.12.q_proj", True),
    ("model.layers.*.q_proj", "model.layers.1.x.q_proj", False),  # * stays inside one component
    ("model.*_proj", "model.q_proj", True),
    ("model.*_proj", "model.q.proj", False),
    ("layers.?.fc", "layers.3.fc", True),
    ("layers.?.fc", "layers.12.fc", False),
    ("**.lm_head", "lm_head", True),
    ("**.lm_head", "a.b.lm_head", True),
    ("**.lm_head", "a.b.lm_headx", False),
    ("model.**.k_proj", "model.k_proj", True),
    ("model.**.k_proj", "model.layers.3.self_attn.k_proj", True),
    ("model.**.k_proj", "model.layers.3.self_attn.xk_proj", False),
    ("model.**", "model", True),
    ("model.**", "model.a.b", True),
    ("model.**", "modelx.a", False),
    ("**", "a.b.c", True),
    ("a.**.**.b", "a.b", True),
    ("self_attn.{k_proj,v_proj}", "self_attn.v_proj", True),
    ("self_attn.{k_proj,v_proj}", "self_attn.q_proj", False),
    ("{encoder,decoder}.block.*.{k,v}", "decoder.block.5.k", True),
    ("h.{*attn,mlp}.c_proj", "h.c_attn.c_proj", True),
    ("h.{**,x}.c_proj", "h.a.b.c_proj", True),
    ("block-1.fc", "block-1.fc", True),
])
def test_glob_matches(pattern, path, hit):
    assert bool(compile_glob(pattern).fullmatch(path)) is hit


@pytest.mark.parametrize("pattern, reason", [
    ("", "empty"),
    ("a{b,c", "unclosed '{'"),
    ("a}b", "'}' without a matching '{'"),
    ("a.{b,}", "empty alternative"),
    ("a.{b,{c,d}}", "nested braces"),
    ("a b", "whitespace"),
    ("a.***.b", "'***'"),
    (".a", "leading, trailing or double '.'"),
    ("a.", "leading, trailing or double '.'"),
    ("a..b", "leading, trailing or double '.'"),
    ("{a,.b}", "leading, trailing or double '.'"),
    ("a/b", "character '/' is not allowed"),
    ("a.b[0]", "character '[' is not allowed"),
    ("k_proj,v_proj", "',' outside braces"),
    ("a**.b", "'**' must be a whole path component"),
])
def test_bad_glob(pattern, reason):
    with pytest.raises(ValueError, match="bad glob") as e:
        compile_glob(pattern)
    assert reason in str(e.value) and "\n" not in str(e.value)


# --- layer selection --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form, selected", [
    ({"first": 2}, {0, 1}),
    ({"last": 2}, {4, 5}),
    ({"indices": [0, 3, -1]}, {0, 3, 5}),
    ({"indices": [-6, 0]}, {0}),
    ({"range": [1, 4]}, {1, 2, 3}),
    ({"last": 6}, {0, 1, 2, 3, 4, 5}),
])
def test_layer_select_resolve(form, selected):
    assert LayerSelect(**form).resolve(6) == selected


@pytest.mark.parametrize("form, message", [
    ({"indices": [0, 6]}, "layer index 6 is out of range for a stack of 6 layers"),
    ({"indices": [-7]}, "layer index -7 is out of range for a stack of 6 layers"),
    ({"first": 7}, "first 7 but the stack has only 6 layers"),
    ({"last": 30}, "last 30 but the stack has only 6 layers"),
    ({"range": [2, 9]}, r"range \[2, 9\) but the stack has only 6 layers"),
])
def test_layer_select_too_short_a_stack(form, message):
    with pytest.raises(ValueError, match=message):
        LayerSelect(**form).resolve(6)


@pytest.mark.parametrize("form, message", [
    ({}, "exactly one of first, last, last_fraction, indices, range; got none"),
    ({"first": 1, "last": 1}, "got first, last"),
    ({"first": 0}, "greater than or equal to 1"),
    ({"last": -1}, "greater than or equal to 1"),
    ({"indices": []}, "at least 1 item"),
    ({"range": [3, 3]}, "0 <= start < stop"),
    ({"range": [-2, 3]}, "0 <= start < stop"),
    ({"range": [1, 2, 3]}, "at most 2 items"),
    ({"every": 2}, "Extra inputs"),
])
def test_layer_select_invalid(form, message):
    with pytest.raises(ValidationError, match=message):
        LayerSelect(**form)


def test_layer_select_describe():
    assert [LayerSelect(**f).describe() for f in ({"first": 1}, {"indices": [0, -1]}, {"range": [2, 5]})] == [
        "first 1", "indices [0, -1]", "range [2, 5)"]


# --- Match.accepts ----------------------------------------------------------------------------------------------

def site(path, module_class="Linear", op="linear", layer=None):
    return SimpleNamespace(path=path, module_class=module_class, op=op, layer=layer)


LLAMA = [site(f"model.layers.{i}.self_attn.{p}", layer=("model.layers", i)) for i in range(4)
         for p in ("q_proj", "k_proj", "v_proj")] + [site("lm_head")]
T5 = [site(f"{stack}.block.{i}.layer.0.SelfAttention.{p}", layer=(f"{stack}.block", i))
      for stack in ("encoder", "decoder") for i in range(3) for p in ("q", "k")]
T5_SIZES = {"encoder.block": 3, "decoder.block": 3}


def selected(match: dict, sites, sizes) -> list[str]:
    m = Match(**match)
    return [s.path for s in sites if m.accepts(s, sizes)]


def test_match_path_layers_and_exclude():
    sizes = {"model.layers": 4}
    assert selected({"path": "model.layers.*.self_attn.{k_proj,v_proj}", "layers": {"last": 1}}, LLAMA, sizes) == [
        "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert len(selected({"op": "linear"}, LLAMA, sizes)) == 13
    assert len(selected({"op": "linear", "exclude": ["**.lm_head", "**.q_proj"]}, LLAMA, sizes)) == 8
    assert selected({"path": ["lm_head", "**.q_proj"], "layers": {"indices": [-1]}}, LLAMA, sizes) == [
        "model.layers.3.self_attn.q_proj"]  # lm_head is in no stack, so `layers` drops it


def test_match_class_and_op_are_anded():
    sites = [site("a", "Linear"), site("b", "Conv1D"), site("c", "LlamaAttention", op="attention")]
    assert selected({"module_class": ["Linear", "Conv1D"]}, sites, {}) == ["a", "b"]
    assert selected({"module_class": "Conv1D", "op": "linear"}, sites, {}) == ["b"]
    assert selected({"module_class": "Conv1D", "op": "attention"}, sites, {}) == []
    assert selected({"op": "attention"}, sites, {}) == ["c"]


def test_match_layers_are_per_stack_t5():
    got = selected({"path": "**.k", "layers": {"last": 1}}, T5, T5_SIZES)
    assert got == ["encoder.block.2.layer.0.SelfAttention.k", "decoder.block.2.layer.0.SelfAttention.k"]
    assert len(selected({"path": "decoder.**", "layers": {"range": [0, 2]}}, T5, T5_SIZES)) == 4


def test_match_layers_beyond_the_stack_is_a_match_error():
    with pytest.raises(MatchError, match="cannot select layers of 'encoder.block': last 4 but the stack has only 3"):
        selected({"path": "**.k", "layers": {"last": 4}}, T5, T5_SIZES)


def test_match_describe():
    m = Match(path="model.layers.*.self_attn.{k_proj,v_proj}", op="linear", layers={"last": 30})
    assert m.describe() == "path=model.layers.*.self_attn.{k_proj,v_proj} op=linear layers=last 30"
    m = Match(module_class=["Linear", "Conv1D"], exclude="**.lm_head")
    assert m.describe() == "module_class=Linear|Conv1D exclude=**.lm_head"


# --- recipes ----------------------------------------------------------------------------------------------------

def test_valid_recipe_and_round_trip():
    recipe = parse(VALID)
    assert isinstance(recipe, Recipe) and isinstance(recipe, recipe_model())
    assert (recipe.name, recipe.model, recipe.task, recipe.num_labels) == ("demo", "tiny-llama", "seq_cls", 3)
    assert recipe.trainable_modules == ["score"] and recipe.train == TrainConfig(lr=0.001, max_steps=5, data={"format": "classification"})
    rule = recipe.rules[0]
    assert isinstance(rule, Rule) and rule.adapter == ScaleConfig(rank=4)
    assert rule.match.path == ["model.layers.*.self_attn.{k_proj,v_proj}"] and rule.match.exclude == ["**.lm_head"]
    assert rule.match.layers == LayerSelect(last=2)
    assert recipe.rules[1].adapter == PromptConfig()
    text = dump_recipe(recipe)
    assert "rank: 4" in text and "length: 10" in text and "first:" not in text  # defaults written, layers as given
    assert parse_recipe(text) == recipe


def test_load_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(VALID)
    assert load_recipe(path).name == "demo"
    with pytest.raises(RecipeError, match=f"^recipe not found: {tmp_path / 'nope.yaml'}$"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_problem_at_once_with_lines():
    text = """\
    name: demo
    task: causal
    rules:
      - name: a
        match:
          path: "model..x"
          layers: {first: 0}
        adapter: {kind: test_scale, rank: eight}
      - name: b-c
        match: {layers: {last: 2}}
        adapter:
          kind: test_prompt
          lenght: 3
      - name: d
        match: {op: linear, path: ["a{b", ok]}
        adapter: {kind: test_scale}
        colour: red
    """
    assert problems(text) == [
        "r.yaml:2: task: Input should be 'causal_lm', 'seq2seq_lm', 'seq_cls', 'token_cls' or 'masked_lm', "
        "got 'causal'",
        "r.yaml:6: rules[0].match.path: bad glob 'model..x': leading, trailing or double '.'",
        "r.yaml:7: rules[0].match.layers.first: Input should be greater than or equal to 1, got 0",
        "r.yaml:8: rules[0].adapter.rank: Input should be a valid integer, unable to parse string as an integer, "
        "got 'eight'",
        "r.yaml:9: rules[1].name: String should match pattern '^[A-Za-z_][A-Za-z0-9_]*$', got 'b-c'",
        "r.yaml:10: rules[1].match: match needs at least one of path, module_class, op, role "
        "(layers, experts and exclude only narrow)",
        "r.yaml:13: rules[1].adapter.lenght: Extra inputs are not permitted; did you mean 'length'?",
        "r.yaml:15: rules[2].match.path[0]: bad glob 'a{b': unclosed '{'",
        "r.yaml:17: rules[2].colour: Extra inputs are not permitted",
    ]


def test_unknown_top_level_key_and_wrong_type():
    assert problems("name: x\nrule: []\nnum_labels: many\n") == [
        "r.yaml:1: rules: Field required",
        "r.yaml:2: rule: Extra inputs are not permitted; did you mean 'rules'?",
        "r.yaml:3: num_labels: Input should be a valid integer, unable to parse string as an integer, got 'many'",
    ]


def test_a_boolean_is_never_read_as_a_number():
    """YAML reads yes/on/true as booleans and pydantic's lax mode would turn them into 1: every such field is
    reported where it is, while a boolean field still takes one."""
    boolean = "(a boolean; YAML reads true/false/yes/no/on/off as booleans)"
    assert problems("""\
    name: x
    num_labels: yes
    rules:
      - name: a
        match: {path: x, layers: {indices: [1, on]}}
        adapter: {kind: ina, inhibition: true, rank: 4}
    train: {lr: 1.0e-4, data: {format: text, packing: true}, max_steps: on}
    """) == [
        f"r.yaml:2: num_labels: Input should be a valid integer, got true {boolean}",
        f"r.yaml:5: rules[0].match.layers.indices[1]: Input should be a valid integer, got true {boolean}",
        f"r.yaml:6: rules[0].adapter.inhibition: Input should be a valid number, got true {boolean}",
        f"r.yaml:7: train.max_steps: Input should be a valid integer, got true {boolean}",
    ]
    recipe = parse_recipe("name: x\nrules: [{name: a, match: {op: linear}, adapter: {kind: ina, inhibition: 1}}]\n"
                          "train: {lr: 1, max_steps: 2, data: {format: text, packing: true}}\n")
    assert recipe.rules[0].adapter.inhibition == 1.0 and recipe.train.data.packing is True


def test_unknown_and_missing_kind_list_registered_kinds():
    lines = problems("""\
    name: x
    rules:
      - name: a
        match: {op: linear}
        adapter: {kind: lora, r: 8}
      - name: b
        match: {op: linear}
        adapter: {rank: 8}
    """)
    assert [line.split(";")[0] for line in lines] == [
        "r.yaml:5: rules[0].adapter.kind: unknown adapter kind 'lora'",
        "r.yaml:8: rules[1].adapter.kind: missing adapter kind"]
    registered = ", ".join(sorted(registry.kinds()))
    assert all(line.endswith(f"; registered kinds: {registered}") for line in lines)
    assert "test_prompt, test_scale" in registered


def test_duplicate_rule_names_and_duplicate_keys():
    assert problems("""\
    name: x
    rules:
      - name: a
        match: {op: linear}
        adapter: {kind: test_scale}
      - name: a
        match: {op: linear}
        adapter: {kind: test_scale}
        adapter: {kind: test_scale}
    """) == [
        "r.yaml:6: rules[1].name: duplicate rule name 'a' (also rules[0])",
        "r.yaml:9: rules[1].adapter: duplicate key (first given on line 8)",
    ]


def test_empty_match_and_empty_rules():
    assert problems("name: x\nrules:\n  - name: a\n    match: {}\n    adapter: {kind: test_scale}\n") == [
        "r.yaml:4: rules[0].match: match needs at least one of path, module_class, op, role "
        "(layers, experts and exclude only narrow)"]
    assert problems("name: x\nrules: []\n") == ["r.yaml:2: rules: List should have at least 1 item after "
                                                 "validation, not 0"]


@pytest.mark.parametrize("text, message", [
    ("", "r.yaml: the recipe is empty"),
    ("# only a comment\n", "r.yaml: the recipe is empty"),
    ("- name: x\n", "r.yaml:1: a recipe must be a mapping with name and rules, got list"),
    ("name: x\nrules: [\n", "r.yaml:3: invalid YAML: did not find expected node content (while parsing a flow node)"),
    ("name: x\n---\nname: y\n", "r.yaml:2: invalid YAML: but found another document "
                                "(expected a single document in the stream)"),
    ("name: x\n  bad: indent\n", "r.yaml:2: invalid YAML: mapping values are not allowed in this context"),
])
def test_not_a_recipe(text, message):
    with pytest.raises(RecipeError) as e:
        parse(text)
    assert str(e.value) == message


def test_import_that_does_not_exist():
    assert problems("name: x\nimports: [no_such_graftr_module]\nrules:\n  - name: a\n    match: {op: linear}\n"
                    "    adapter: {kind: test_scale}\n") == [
        "r.yaml:2: imports[0]: cannot import 'no_such_graftr_module' (listed in the recipe's imports): "
        "No module named 'no_such_graftr_module'"]


def test_user_kind_registered_through_imports(tmp_path, monkeypatch):
    (tmp_path / "graftr_test_user_kind.py").write_text(textwrap.dedent("""\
        from typing import Literal
        from torch import nn
        from graftr.registry import AdapterConfig, register_adapter

        class ShiftConfig(AdapterConfig):
            kind: Literal["test_user_shift"] = "test_user_shift"
            amount: float = 0.0

        @register_adapter(ShiftConfig, ops=("linear",))
        class Shift(nn.Module):
            pass
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "graftr_test_user_kind", raising=False)
    recipe = parse("""\
    name: x
    imports: [graftr_test_user_kind]
    rules:
      - name: a
        match: {op: linear}
        adapter: {kind: test_user_shift, amount: 0.5}
    """)
    assert type(recipe.rules[0].adapter).__name__ == "ShiftConfig" and recipe.rules[0].adapter.amount == 0.5
    assert "test_user_shift" in registry.kinds()
    assert parse_recipe(dump_recipe(recipe)) == recipe


def test_the_registry_is_keyed_by_config_class():
    """A rule's validated adapter config is an instance of the registered class, and finds its kind by its class; a
    class that merely copies a registered kind's name is not that kind, and a second module cannot take a name."""
    recipe = parse("name: x\nrules: [{name: a, match: {op: linear}, adapter: {kind: test_scale, rank: 2}}]\n")
    config = recipe.rules[0].adapter
    assert type(config) is ScaleConfig and registry.kind_of(config) == registry.kinds()["test_scale"]
    assert registry.kind_of(config).module_cls is Scale

    class LookAlike(ScaleConfig):
        pass

    with pytest.raises(GraftrError, match="LookAlike is not a registered adapter config class"):
        registry.kind_of(LookAlike())
    with pytest.raises(ValueError, match="'test_scale' is already registered by Scale"):
        registry.register_adapter(LookAlike, ops=("linear",))(type("Other", (nn.Module,), {}))


def test_json_schema_lists_the_kinds():
    schema = recipe_json_schema()
    json.dumps(schema)
    adapter = schema["$defs"]["Rule"]["properties"]["adapter"]
    assert {"test_scale", "test_prompt"} <= set(adapter["discriminator"]["mapping"])
    assert set(schema["required"]) == {"name", "rules"}
    assert schema["additionalProperties"] is False


# recipes with problems of every kind (values, keys given twice, YAML syntax, aliases) and valid ones
LOADER_TEXTS = [
    VALID,
    "name: x\nrules:\n  - name: a\n    match: {op: linear}\n    adapter: {kind: test_scale}\n"
    "  - name: a\n    match: {op: linear}\n    adapter: {kind: test_scale}\n    adapter: {kind: test_scale}\n",
    "name: x\nrule: []\nnum_labels: many\n",
    "name: x\nnum_labels: yes\nrules:\n  - name: a\n    match: {path: x, layers: {indices: [1, on]}}\n"
    "    adapter: {kind: ina, inhibition: true, rank: 4}\ntrain: {lr: 1.0e-4, max_steps: on}\n",
    "name: x\nrules:\n  - name: a\n    match: &b {op: linear}\n    adapter: {kind: test_scale}\n"
    "  - name: b\n    match: *b\n    adapter: {kind: test_scale, rank: two}\n",
    "name: x\nrules: [\n", "name: x\n---\nname: y\n", "name: x\n  bad: indent\n", "name: 'x\n",
    "name: x\nrules:\n  - {a: 1\n  - b\n", "name: x\n\tfoo: 1\n", "a: &x [*x]\n", "a: *nope\n",
    "a: !!python/object:os.system x\n", "- name: x\n",
]


def loaded(text: str):
    """The recipe and the file:line of each rule, or the error (a YAML syntax error: its file:line only, as each
    parser words its own)."""
    try:
        recipe = parse(text)
    except RecipeError as e:
        message = str(e)
        return message.split(": invalid YAML: ")[0] + ": invalid YAML" if ": invalid YAML: " in message else message
    return recipe, [rule._origin for rule in recipe.rules]


@pytest.mark.skipif(not hasattr(yaml, "CSafeLoader"), reason="PyYAML is built without libyaml")
def test_the_c_loader_reports_what_the_python_loader_reports(monkeypatch):
    """Recipes are read with libyaml (PyYAML's C loader, whose composer gives the nodes their lines) when PyYAML has
    it, else with the pure-Python loader: the same recipes, the same problems on the same lines (an anchor a later
    rule uses again is no cycle). The cyclic garbage collector is paused while a recipe is read (millions of objects
    for 10 MB) and back as it was afterwards."""
    assert recipe_module.YAML_LOADER is yaml.CSafeLoader
    assert gc.isenabled()
    by_c = [loaded(text) for text in LOADER_TEXTS]
    assert gc.isenabled()
    assert by_c[4] == "r.yaml:8: rules[1].adapter.rank: Input should be a valid integer, unable to parse string as " \
                      "an integer, got 'two'"
    monkeypatch.setattr(recipe_module, "YAML_LOADER", yaml.SafeLoader)
    assert [loaded(text) for text in LOADER_TEXTS] == by_c
    gc.disable()
    try:
        loaded(VALID)
        assert not gc.isenabled()
    finally:
        gc.enable()
