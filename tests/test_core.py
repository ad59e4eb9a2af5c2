"""Matching, rewriting, the grafted model's behaviour, and saving/loading adapters."""

import json
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import example_inputs, tiny_model

from graftr import AdapterConfig, LinearAdapter, graft, load_adapter, prepare, register_adapter, save_adapter
from graftr.errors import AdapterLoadError, GraftrError, MatchError
from graftr.fxmeta import MATCHED, RULE
from graftr import passes
from graftr.recipe import parse_recipe

IA3_KV = """
name: kv
rules:
  - name: ia3_kv
    match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}
    adapter: {kind: ia3}
"""


def test_match_only_annotates():
    gm = prepare(tiny_model("llama"))
    code_before = gm.code
    plans = passes.match(gm.site_index, parse_recipe(IA3_KV))
    assert [len(p.sites) for p in plans] == [4]
    tagged = [n for n in gm.graph.nodes if MATCHED in n.meta]
    assert len(tagged) == 4 and all(n.meta[MATCHED] == ["ia3_kv"] for n in tagged)
    assert gm.code == code_before  # nothing rewritten


def test_rule_matching_nothing_lists_closest_paths():
    recipe = parse_recipe(IA3_KV.replace("{k_proj,v_proj}", "kproj"))
    with pytest.raises(MatchError, match=r"rule 'ia3_kv' matched nothing .*closest module paths: .*k_proj"):
        graft(tiny_model("llama"), recipe)


def test_rule_selecting_wrong_op_says_so():
    recipe = parse_recipe("""
name: t
rules: [{name: r, match: {path: "model.layers.*.self_attn"}, adapter: {kind: ia3}}]
""")
    with pytest.raises(MatchError, match="attention site"):
        graft(tiny_model("llama"), recipe)


class MisorderedConfig(AdapterConfig):
    kind: Literal["test_misordered"] = "test_misordered"


@register_adapter(MisorderedConfig, ops=("linear",))
class Misordered(LinearAdapter):
    """A broken kind: inserts its node before the site's input exists."""

    @classmethod
    def from_site(cls, config, site, *, device):
        return cls()

    def forward(self, x, y):
        return y

    def graft(self, graph, site, target):
        with graph.inserting_before(site.nodes[0]):
            return [graph.call_module(target, (site.input, site.output))]


def test_the_graph_is_linted_after_each_rule_and_the_rule_named_in_one_line():
    recipe = parse_recipe("""
name: t
rules:
  - {name: fine, match: {path: "model.layers.0.self_attn.k_proj"}, adapter: {kind: ia3}}
  - {name: broken, match: {path: "model.layers.0.self_attn.v_proj"}, adapter: {kind: test_misordered}}
""")
    with pytest.raises(GraftrError, match=r"^rewrite pass for rule 'broken' \(test_misordered\) produced an invalid "
                       r"graph: .*used before") as info:
        graft(tiny_model("llama"), recipe)
    assert "\n" not in str(info.value)


def test_layer_selection_and_exclusion():
    model = tiny_model("llama", num_hidden_layers=4)
    recipe = parse_recipe("""
name: t
rules:
  - name: r
    match:
      path: "model.layers.*.self_attn.*"
      op: linear
      layers: {last: 3}
      exclude: ["model.layers.2.**", "**.o_proj"]
    adapter: {kind: ia3}
""")
    gm = graft(model, recipe)
    assert sorted(s.path for s in gm.plans[0].sites) == [
        f"model.layers.{i}.self_attn.{p}" for i in (1, 3) for p in ("k_proj", "q_proj", "v_proj")]


def test_parameters_named_after_sites_and_frozen_base():
    model = tiny_model("llama")
    base_names = {n for n, _ in model.named_parameters()}
    gm = graft(model, parse_recipe(IA3_KV))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.ia3_kv.ia3_l" for i in (0, 1) for p in ("k_proj", "v_proj")}
    assert {n for n, _ in gm.named_parameters()} == base_names | trainable
    inserted = [n for n in gm.graph.nodes if n.meta.get(RULE) == "ia3_kv"]
    assert len(inserted) == 4


def test_trainable_modules_and_grad_flow():
    model = tiny_model("bert", task="seq_cls", num_labels=3)
    recipe = parse_recipe("""
name: t
task: seq_cls
num_labels: 3
trainable_modules: [classifier]
rules: [{name: ia3, match: {path: "bert.encoder.layer.*.attention.self.value"}, adapter: {kind: ia3}}]
""")
    gm = graft(model, recipe).train()
    inputs = example_inputs(model, 4, 6)
    out = gm(**inputs, labels=torch.tensor([0, 1, 2, 1]))
    assert type(out).__name__ == "SequenceClassifierOutput" and out.loss.ndim == 0
    out.loss.backward()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == {"classifier.weight", "classifier.bias",
                     "bert.encoder.layer.0.attention.self.value.ia3.ia3_l",
                     "bert.encoder.layer.1.attention.self.value.ia3.ia3_l"}


def test_train_and_eval_switch_dropout():
    model = tiny_model("bert", hidden_dropout_prob=0.3)
    gm = graft(model, parse_recipe("""
name: t
rules: [{name: ia3, match: {path: "bert.encoder.layer.*.attention.self.value"}, adapter: {kind: ia3}}]
"""))
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        gm.train()
        assert not torch.equal(gm(**inputs).logits, gm(**inputs).logits)
        gm.eval()
        torch.testing.assert_close(gm(**inputs).logits, model.eval()(**inputs).logits, atol=1e-6, rtol=0)


def test_loss_matches_hf():
    model = tiny_model("llama")
    gm = prepare(model)
    inputs = example_inputs(model, 2, 7)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss)


def test_unknown_kwarg_is_rejected():
    gm = prepare(tiny_model("llama"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        gm(input_ids=torch.ones(1, 3, dtype=torch.long), pixel_values=torch.ones(1))


def _saved(tmp_path):
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(IA3_KV))
    with torch.no_grad():
        for m in gm.adapter_modules().values():
            m.ia3_l.uniform_(0.5, 1.5)
    return gm, save_adapter(gm, tmp_path / "adapter")


def test_save_load_round_trip(tmp_path):
    gm, path = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "manifest.json", "recipe.yaml"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["versions"]) == {"graftr", "torch", "transformers"}
    assert manifest["base_config"]["model_type"] == "llama" and len(manifest["tensors"]) == 4
    loaded = load_adapter(tiny_model("llama"), path).eval()
    inputs = {"input_ids": torch.randint(3, 100, (2, 5))}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, gm.eval()(**inputs).logits)


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: t.pop(next(iter(t))), "1 missing"),
    (lambda t: t.__setitem__("model.layers.0.extra", torch.ones(2)), "1 unexpected: model.layers.0.extra"),
    (lambda t: t.__setitem__(next(iter(t)), torch.ones(3)), r"1 wrong shape: .* \(3,\) vs \(16,\)"),
])
def test_load_rejects_mismatched_tensors(tmp_path, corrupt, message):
    _, path = _saved(tmp_path)
    tensors = load_file(str(path / "adapter.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(path / "adapter.safetensors"))
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(tiny_model("llama"), path)


def test_load_rejects_another_base(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(AdapterLoadError, match="different base model.*hidden_size: adapter 32 vs model 48"):
        load_adapter(tiny_model("llama", hidden_size=48), path)


def test_save_never_clobbers_foreign_directories(tmp_path):
    gm, path = _saved(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GraftrError, match="not a graftr output directory"):
        save_adapter(gm, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(GraftrError, match="pass --force to replace it"):
        save_adapter(gm, path)
    save_adapter(gm, path, force=True)  # replacing a graftr adapter when asked is fine, and leaves no temporary directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "mine"]


def _user_kind_module(kind: str) -> str:
    """A user's module defining the linear kind ``kind``: ``y' = y + b``, a learned output bias (init: ``init``)."""
    return f'''
from typing import Literal
import torch
import graftr

class ShiftConfig(graftr.AdapterConfig):
    kind: Literal["{kind}"] = "{kind}"
    init: float = 0.0

@graftr.register_adapter(ShiftConfig, ops=("linear",))
class Shift(graftr.LinearAdapter):
    """y' = y + b: a learned output bias."""
    def __init__(self, features, init, device=None):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.full((features,), init, device=device))

    @classmethod
    def from_site(cls, config, site, *, device):
        return cls(site.out_features, config.init, device)

    def forward(self, x, y):
        return y + self.shift
'''


def _shifts_the_logits_by_a_half(recipe) -> None:
    model = tiny_model("llama")
    gm = graft(model, recipe).eval()
    ids = torch.randint(3, 100, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, model(input_ids=ids).logits + 0.5)


def test_user_adapter_kind_from_own_package(tmp_path, monkeypatch):
    """A kind defined in the user's own module, imported by the recipe, grafts like a built-in one."""
    (tmp_path / "my_adapters.py").write_text(_user_kind_module("test_shift"))
    (tmp_path / "recipe.yaml").write_text("""
name: user
imports: [my_adapters]
rules: [{name: shift, match: {path: "lm_head"}, adapter: {kind: test_shift, init: 0.5}}]
""")
    monkeypatch.chdir(tmp_path)
    from graftr.recipe import load_recipe

    _shifts_the_logits_by_a_half(load_recipe(tmp_path / "recipe.yaml"))


def test_user_adapter_kind_from_an_installed_package_entry_point(tmp_path, monkeypatch):
    """An installed package that declares its kind in the `graftr.adapters` entry-point group: usable from YAML with
    no `imports:` line (the distribution is faked with a dist-info directory on sys.path)."""
    from graftr import registry

    (tmp_path / "my_shift.py").write_text(_user_kind_module("test_entry_shift"))
    info = tmp_path / "my_shift-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-shift\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[graftr.adapters]\nshift = my_shift\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", [False])
    _shifts_the_logits_by_a_half(parse_recipe("""
name: ep
rules: [{name: shift, match: {path: "lm_head"}, adapter: {kind: test_entry_shift, init: 0.5}}]
"""))
    assert "test_entry_shift" in registry.kinds()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "t5"])
def test_static_plan_equals_the_dynamic_graphs(arch):
    # `graftr apply` plans on a graph traced at the example shapes only (half the tracing time): every linear and
    # attention site, and every rule's sites and parameters, must be those of the dynamic graph training uses
    recipe = parse_recipe("""
name: t
rules:
  - {name: scale, match: {op: linear, exclude: "**.{lm_head,wo,wi,shared}"}, adapter: {kind: ia3}}
  - {name: prompts, match: {op: attention, layers: {last: 1}}, adapter: {kind: gated_prompt, length: 3}}
""")

    def plan(gm):
        sites = {(s.op, s.path) for s in gm.site_index.all()}
        gm = graft(gm, recipe)
        return sites, [(p.name, [s.path for s in p.sites], p.params_added) for p in gm.plans]

    model = tiny_model(arch)
    static, dynamic = plan(prepare(model, dynamic=False)), plan(prepare(model))
    assert static == dynamic and len(static[1][0][1]) > 4
