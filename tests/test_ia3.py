"""IA³: identity at init, equality with an eager reference, merge, dtypes, composition order."""

import pytest
import torch
from torch import nn
from zoo import example_inputs, tiny_model

from graftr import graft
from graftr.adapters.ia3 import IA3
from graftr.errors import MergeError
from graftr.recipe import parse_recipe

LLAMA_IA3 = """
name: t
rules:
  - name: attn
    match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}
    adapter: {kind: ia3, scale: output}
  - name: ff
    match: {path: "model.layers.*.mlp.down_proj"}
    adapter: {kind: ia3, scale: input}
"""


def _randomize(gm, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in gm.adapter_modules().values():
            module.ia3_l.copy_(torch.rand(module.ia3_l.shape, generator=gen) + 0.5)


def _eager_reference(model, gm):
    """Hooks on the HF model's own nn.Linear modules applying y*l / W(x*l)+b with the grafted vectors."""
    handles = []
    for target, module in gm.adapter_modules().items():
        site_path = target.rsplit(".", 1)[0]
        linear = model.get_submodule(site_path)
        l = module.ia3_l.detach()
        if module.position == "output":
            handles.append(linear.register_forward_hook(lambda m, i, o, l=l: o * l))
        else:
            handles.append(linear.register_forward_pre_hook(lambda m, i, l=l: (i[0] * l,)))
    return handles


def test_identity_at_init_and_exact_site_count():
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(LLAMA_IA3)).eval()
    assert [len(p.sites) for p in gm.plans] == [4, 2]
    inputs = example_inputs(model, 3, 7)
    with torch.no_grad():
        assert torch.equal(gm(**inputs).logits, model(**inputs).logits)


def test_equals_eager_reference_output_and_input_scaling():
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(LLAMA_IA3)).eval()
    _randomize(gm)
    inputs = example_inputs(model, 2, 9)
    handles = _eager_reference(model, gm)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = gm(**inputs).logits
    for h in handles:
        h.remove()
    assert not torch.allclose(got, model(**inputs).logits.detach(), atol=1e-4)  # the vectors do something
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,recipe", [
    ("llama", LLAMA_IA3),
    ("gpt2", """
name: t
rules:
  - {name: attn, match: {path: "transformer.h.*.attn.c_attn"}, adapter: {kind: ia3}}
  - {name: ff, match: {path: "transformer.h.*.mlp.c_proj"}, adapter: {kind: ia3, scale: input}}
"""),
])
def test_merged_equals_unmerged(arch, recipe):
    model = tiny_model(arch)
    gm = graft(model, parse_recipe(recipe)).eval()
    _randomize(gm)
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        before = gm(**inputs).logits
        gm.merge_()
        after = gm(**inputs).logits
    assert not gm.adapter_modules() and not any(p.requires_grad for p in gm.parameters())
    assert all(n.op != "call_module" or not n.target.endswith((".attn", ".ff")) for n in gm.graph.nodes)
    torch.testing.assert_close(after, before, atol=2e-6, rtol=0)


def test_module_math_and_merge_on_a_linear():
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    for scale in ("output", "input"):
        m = IA3(3 if scale == "output" else 5, scale)
        with torch.no_grad():
            m.ia3_l.uniform_(0.5, 1.5)
        y = m(x, lin(x)) if scale == "output" else lin(m(x))
        ref = lin(x) * m.ia3_l if scale == "output" else lin(x * m.ia3_l)
        torch.testing.assert_close(y, ref)
        w, b = m.merge_into(lin.weight.detach(), lin.bias.detach(), "out_in")
        torch.testing.assert_close(x @ w.T + b, ref, atol=1e-6, rtol=0)
        # Conv1D layout: weight is (in, out)
        w2, b2 = m.merge_into(lin.weight.detach().T, lin.bias.detach(), "in_out")
        torch.testing.assert_close(x @ w2 + b2, ref, atol=1e-6, rtol=0)


def test_fp32_vectors_on_a_bf16_base():
    model = tiny_model("llama").to(torch.bfloat16)
    gm = graft(model, parse_recipe(LLAMA_IA3)).eval()
    assert all(m.ia3_l.dtype == torch.float32 for m in gm.adapter_modules().values())
    inputs = example_inputs(model, 2, 5)
    with torch.no_grad():
        out = gm(**inputs).logits
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, model(**inputs).logits)  # identity at init holds in bf16 too


@pytest.mark.parametrize("scale,layout", [("output", "out_in"), ("input", "out_in"), ("output", "in_out")])
def test_merge_on_a_bf16_base_rounds_once(scale, layout):
    """W·l computed in fp32 and rounded to bf16 once: rounding l to bf16 first would move many weights by an ulp."""
    features = 64
    m = IA3(features, scale)
    with torch.no_grad():
        m.ia3_l.uniform_(0.5, 1.5)
    rows = (scale == "output") == (layout == "out_in")  # the axis of W that carries the scaled features
    weight = torch.randn((features, 32) if rows else (32, features), dtype=torch.bfloat16)
    bias = torch.randn(features, dtype=torch.bfloat16)
    l = m.ia3_l.detach()
    expected = (weight.float() * (l[:, None] if rows else l[None, :])).to(torch.bfloat16)
    merged, merged_bias = m.merge_into(weight, bias, layout)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)
    if scale == "output":
        assert torch.equal(merged_bias, (bias.float() * l).to(torch.bfloat16))


def test_input_scaling_after_a_branch_refuses_to_merge():
    """Scaling a site's input after a branch that reads the unscaled input cannot be folded into W."""
    pytest.importorskip("graftr.adapters.ina")
    recipe = parse_recipe("""
name: t
rules:
  - {name: lora, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ina, inhibition: 0.0}}
  - {name: ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3, scale: input}}
""")
    gm = graft(tiny_model("llama"), recipe)
    with pytest.raises(MergeError, match="input scaling after a branch"):
        gm.merge_()


def test_rules_compose_in_recipe_order():
    recipe = parse_recipe("""
name: t
rules:
  - {name: first, match: {path: "model.layers.0.self_attn.k_proj"}, adapter: {kind: ia3}}
  - {name: second, match: {path: "model.layers.0.self_attn.k_proj"}, adapter: {kind: ia3}}
""")
    model = tiny_model("llama")
    gm = graft(model, recipe).eval()
    _randomize(gm)
    first = gm.get_submodule("model.layers.0.self_attn.k_proj.first")
    second = gm.get_submodule("model.layers.0.self_attn.k_proj.second")
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    a, b = nodes["model.layers.0.self_attn.k_proj.first"], nodes["model.layers.0.self_attn.k_proj.second"]
    assert b.args[1] is a  # the second rule scales what the first produced
    assert a.meta["graftr_rule"] == "first" and b.meta["graftr_rule"] == "second"
    lin = model.get_submodule("model.layers.0.self_attn.k_proj")
    h = lin.register_forward_hook(lambda m, i, o: o * first.ia3_l.detach() * second.ia3_l.detach())
    inputs = example_inputs(model, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
    h.remove()
