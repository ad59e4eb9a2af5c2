"""scale_bias (LLaMA-Adapter V2's bias and scale tuning): its formula, identity at init, exact merging, PEFT refusal,
and the shipped V2 recipe."""

import pytest
import torch
from after_training_kit import cli_error, randomize_and_save
from torch import nn
from zoo import example_inputs, tiny_model

from graftr import cli, graft
from graftr.adapters.scale_bias import ScaleBias
from graftr.errors import GraftrError, MergeError
from graftr.formats.peft import export_peft
from graftr.recipe import load_recipe, parse_recipe
from test_recipes_shipped import RECIPES

EVERY_LINEAR = {
    "llama": "model.layers.*.{self_attn,mlp}.*",
    "gpt2": "transformer.h.*.{attn,mlp}.*",  # Conv1D (weight (in, out)), fused c_attn, biases everywhere
}


def recipe(arch: str) -> str:
    return f"""
name: t
rules:
  - name: sb
    match: {{op: linear, path: "{EVERY_LINEAR[arch]}"}}
    adapter: {{kind: scale_bias}}
"""


def randomize(gm, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in gm.adapter_modules().values():
            module.scale.copy_(torch.rand(module.scale.shape, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


def test_module_equals_its_formula_and_merges_on_both_layouts():
    for base_bias in (True, False):
        lin = nn.Linear(5, 3, bias=base_bias)
        m = ScaleBias(3)
        x = torch.randn(4, 5)
        assert torch.equal(m(x, lin(x)), lin(x))  # s = 1, b = 0
        with torch.no_grad():
            m.scale.uniform_(0.5, 1.5)
            m.bias.normal_()
        expected = m.scale * (x @ lin.weight.T + (lin.bias if base_bias else 0) + m.bias)
        torch.testing.assert_close(m(x, lin(x)), expected, atol=0, rtol=0)
        b0 = lin.bias.detach() if base_bias else None
        w, b = m.merge_into(lin.weight.detach(), b0, "out_in")
        torch.testing.assert_close(x @ w.T + b, expected, atol=1e-6, rtol=0)
        w2, b2 = m.merge_into(lin.weight.detach().T, b0, "in_out")  # Conv1D stores W as (in, out)
        torch.testing.assert_close(x @ w2 + b2, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,sites", [("llama", 14), ("gpt2", 8)])
def test_identity_at_init_equals_eager_reference_and_merges_exactly(arch, sites):
    model = tiny_model(arch)
    gm = graft(model, parse_recipe(recipe(arch))).eval()
    [plan] = gm.plans
    assert len(plan.sites) == sites  # every linear of every block, none outside them (lm_head, wte)
    inputs = example_inputs(model, 3, 7)
    with torch.no_grad():
        assert torch.equal(gm(**inputs).logits, model(**inputs).logits)
    randomize(gm)
    handles = []
    for target, module in gm.adapter_modules().items():  # the formula on the HF model's own modules
        s, b = module.scale.detach(), module.bias.detach()
        handles.append(model.get_submodule(target.rsplit(".", 1)[0]).register_forward_hook(
            lambda m, i, o, s=s, b=b: s * (o + b)))
    with torch.no_grad():
        expected = model(**inputs).logits
        got = gm(**inputs).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert (got - model(**inputs).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        gm.merge_()
        merged = gm(**inputs).logits
    assert not gm.adapter_modules() and not any(p.requires_grad for p in gm.parameters())
    torch.testing.assert_close(merged, got, atol=2e-6, rtol=0)
    if arch == "llama":  # bias-free linears gained a bias in the graph
        assert gm.get_parameter("model.layers.0.self_attn.q_proj.bias").shape == (32,)


def test_merge_into_a_checkpoint_without_biases_refuses(tmp_path, capsys):
    """Llama's linears have no bias: a Llama checkpoint cannot hold b, so graftr merge refuses and writes nothing."""
    tiny_model("llama").save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    randomize_and_save(graft(base, parse_recipe(recipe("llama"))), tmp_path / "adapter")
    line = cli_error(capsys, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert "has no bias there to hold it" in line and "scale_bias" in line
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_checkpoint_with_biases_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    gm = randomize_and_save(graft(base, parse_recipe(recipe("gpt2"))), tmp_path / "adapter")
    assert cli.main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    inputs = example_inputs(base, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, gm(**inputs).logits, atol=1e-5, rtol=0)


def test_peft_export_refuses_in_one_line(tmp_path):
    gm = graft(tiny_model("llama"), parse_recipe(recipe("llama")))
    with pytest.raises(GraftrError, match="^scale_bias has no HF PEFT equivalent") as e:
        export_peft(gm, tmp_path / "peft")
    assert "\n" not in str(e.value) and not (tmp_path / "peft").exists()


def test_v2_recipe_on_a_tiny_llama_trains_norms_and_is_identity_at_init():
    text = (RECIPES / "llama_adapter_v2.yaml").read_text()
    model = tiny_model("llama", num_hidden_layers=4)
    gm = graft(model, parse_recipe(text.replace("last: 30", "last: 2"))).eval()
    assert {p.name: len(p.sites) for p in gm.plans} == {"llama_adapter": 2, "scale_bias": 28}
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "norm" in n}
    assert norms == {f"model.layers.{i}.{n}.weight" for i in range(4) for n in ("input_layernorm",
                                                                                 "post_attention_layernorm")} | {
        "model.norm.weight"}
    dim, inter, heads = 32, 64, 4
    per_layer_sb = 2 * (dim + 2 * 16 + dim + 2 * inter + dim)  # q, k/v (2 kv heads of 8), o, gate/up, down
    assert gm.trainable_counts()[0] == 2 * (10 * dim + heads) + 4 * per_layer_sb + (2 * 4 + 1) * dim
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        assert torch.equal(gm(**inputs).logits, model(**inputs).logits)
    with pytest.raises(MergeError, match="attention"):  # the gated prompts cannot be folded into weights
        gm.merge_()


@pytest.mark.slow  # one trace of the Llama-2-7B structure on the meta device (~15-30 s)
def test_v2_recipe_counts_its_header_on_llama2_7b():
    from graftr.models import build_model, resolve

    gm = graft(build_model(resolve("meta-llama/Llama-2-7b-hf").config, device="meta"),
               load_recipe(RECIPES / "llama_adapter_v2.yaml"))
    prompts, scale_bias = 30 * 10 * 4096 + 30 * 32, 32 * 2 * (4 * 4096 + 2 * 11008 + 4096)
    norms = 32 * 2 * 4096 + 4096
    assert {p.name: (len(p.sites), p.params_added) for p in gm.plans} == {
        "llama_adapter": (30, prompts), "scale_bias": (224, scale_bias)}
    assert gm.trainable_counts()[0] == prompts + scale_bias + norms == 4_215_744
    assert "= 4,215,744 trainable parameters" in (RECIPES / "llama_adapter_v2.yaml").read_text()
