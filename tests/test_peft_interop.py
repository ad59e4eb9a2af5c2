"""PEFT interop for IA³ and AdaptionPrompt, both ways, checked against stock PEFT itself: a graftr adapter exported
and loaded with ``PeftModel.from_pretrained`` computes the same logits as graftr; a PEFT adapter saved with
``save_pretrained`` and imported computes the same logits as PEFT. PEFT's GPT-2 AdaptionPrompt is shown to be a
different model (the branch is never projected through c_proj) and refused both ways. ``graftr export`` end to end,
and PEFT directories given to ``--adapter``."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize_and_save
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from zoo import IA3_TARGETS, example_inputs, ia3_recipe, tiny_model

from graftr import GraftedModel, cli, graft, load_adapter
from graftr.errors import GraftrError
from graftr.formats.peft import export_peft, import_peft
from graftr.recipe import parse_recipe

peft = pytest.importorskip("peft")
from peft import AdaptionPromptConfig, IA3Config, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

ATOL = 1e-5


def prompt_recipe(options: str = "gate: scalar", match: str = "{op: attention, layers: {last: 2}}") -> str:
    return f"""
name: gp
rules:
  - {{name: gp, match: {match}, adapter: {{kind: gated_prompt, length: 3, {options}}}}}
"""


def randomize(module, seed=0, names=("ia3_l", "adaption_")):
    """Move every trainable tensor of a grafted model, or PEFT's tensors named like ``names``, away from its init."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(module, GraftedModel):
        params = list(module.adapter_state_dict().values())
    else:
        params = [p for n, p in module.named_parameters() if any(k in n for k in names)]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def peft_layout(peft_model) -> dict[str, tuple]:
    """The keys and shapes PEFT itself saves for this model."""
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def saved_layout(path) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(path / "adapter_model.safetensors")).items()}


# ---- IA³ ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_export_loads_in_stock_peft(arch, tmp_path):
    model = tiny_model(arch)
    gm = randomize(graft(model, parse_recipe(ia3_recipe(*IA3_TARGETS[arch]))))
    inputs = example_inputs(model, 2, 9)
    ours = logits(gm, inputs)
    assert (ours - logits(model, inputs)).abs().max() > 1e-2  # the vectors are far from ones
    out = export_peft(gm, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    default = get_peft_model(tiny_model(arch), IA3Config(task_type="CAUSAL_LM"))  # PEFT's own defaults
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert set(config["target_modules"]) == {"llama": {"k_proj", "v_proj", "down_proj"},
                                             "gpt2": {"attn.c_attn", "mlp.c_proj"}}[arch]
    assert config["feedforward_modules"] == {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"]}[arch]
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    assert saved_layout(out) == peft_layout(default)  # PEFT's key names and its (out, 1) / (1, in) shapes
    loaded = PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    torch.testing.assert_close(logits(loaded, inputs), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_peft_adapter_imports_exactly(arch, tmp_path):
    peft_model = randomize(get_peft_model(tiny_model(arch), IA3Config(task_type="CAUSAL_LM")))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    inputs = example_inputs(peft_model, 2, 9)
    theirs = logits(peft_model, inputs)
    gm = import_peft(tiny_model(arch), tmp_path / "peft").eval()
    plans = {p.name: (p.rule.adapter.scale, len(p.sites)) for p in gm.plans}
    assert plans == {"ia3": ("output", {"llama": 4, "gpt2": 2}[arch]), "ia3_ff": ("input", 2)}
    torch.testing.assert_close(logits(gm, inputs), theirs, atol=ATOL, rtol=0)
    loaded = load_adapter(tiny_model(arch), tmp_path / "peft").eval()  # the package API takes PEFT dirs too
    torch.testing.assert_close(logits(loaded, inputs), theirs, atol=ATOL, rtol=0)
    again = export_peft(gm, tmp_path / "again")  # and back: the same tensors under the same keys
    saved, exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(again / "adapter_model.safetensors"))
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def saved_for_backward(model, inputs) -> tuple[int, list]:
    """Bytes of the distinct storages autograd keeps for one training forward, and the kept shapes."""
    storages, shapes = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return sum(storages.values()), shapes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_keeps_no_more_for_backward_than_peft(arch):
    # the grafted graph's default positions are one row broadcast over the batch, as in the HF forward, so its
    # rotary tables (GPT-2: position embeddings) are kept once, not per row; the rest is the same computation
    config = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0} if arch == "gpt2" else {}
    ours = graft(tiny_model(arch, **config), parse_recipe(ia3_recipe(*IA3_TARGETS[arch])))
    theirs = get_peft_model(tiny_model(arch, **config), IA3Config(task_type="CAUSAL_LM"))
    inputs = example_inputs(theirs, 4, 16)
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"])}
    (our_bytes, our_shapes), (their_bytes, _) = saved_for_backward(ours, inputs), saved_for_backward(theirs, inputs)
    assert our_bytes <= their_bytes
    if arch == "llama":  # (1, 1, T, head_dim) cos and sin, not (4, 1, T, head_dim)
        head_dim = ours.hf_config.hidden_size // ours.hf_config.num_attention_heads
        assert (1, 1, 16, head_dim) in our_shapes and (4, 1, 16, head_dim) not in our_shapes
    rows = torch.arange(16).repeat(4, 1)  # positions given row by row: not shared, the same logits
    ours.eval()
    torch.testing.assert_close(logits(ours, {**inputs, "position_ids": rows}), logits(ours, inputs), atol=0, rtol=0)


def test_ia3_bert_classifier_with_peft_suffix_semantics(tmp_path):
    """PEFT's defaults on BERT: ``output.dense`` is a whole-component target and a plain-suffix feedforward entry, so
    ``attention.output.dense`` scales its input too; the SEQ_CLS head is saved and loaded."""
    peft_model = randomize(get_peft_model(tiny_model("bert", "seq_cls", num_labels=3),
                                          IA3Config(task_type="SEQ_CLS")), names=("ia3_l", "modules_to_save"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    inputs = example_inputs(peft_model, 2, 9)
    gm = import_peft(tiny_model("bert", "seq_cls", num_labels=3), tmp_path / "peft").eval()
    ff = sorted(s.path for p in gm.plans if p.rule.adapter.scale == "input" for s in p.sites)
    assert ff == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.output.dense", "output.dense")]
    assert gm.recipe.trainable_modules == ["classifier"]
    torch.testing.assert_close(logits(gm, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)
    out = export_peft(gm, tmp_path / "again")
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    loaded = PeftModel.from_pretrained(tiny_model("bert", "seq_cls", num_labels=3), str(out)).eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("change,message", [
    ({"feedforward_modules": None}, "feedforward_modules is not set"),
    ({"target_modules": ["mlp"]}, "select model.layers.0.mlp, which is not a linear layer"),
    ({"target_modules": ["nothing"]}, r'target_modules \["nothing"\] match no module'),
    ({"some_new_option": 1}, "some_new_option=1: graftr does not know this option"),
])
def test_ia3_import_refuses_what_it_cannot_honour(tmp_path, change, message):
    get_peft_model(tiny_model("llama"), IA3Config(task_type="CAUSAL_LM")).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GraftrError, match=message):
        import_peft(tiny_model("llama"), tmp_path)


def test_ia3_export_refuses_two_vectors_on_one_module(tmp_path):
    gm = graft(tiny_model("llama"), parse_recipe(ia3_recipe("model.layers.*.mlp.down_proj", "**.down_proj")))
    with pytest.raises(GraftrError, match="has two ia3 adapters; PEFT's format holds one IA3 vector per module"):
        export_peft(gm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- AdaptionPrompt ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_scalar_gated_prompt_export_loads_in_stock_peft(arch, tmp_path):
    model = tiny_model(arch, num_hidden_layers=3)  # GQA: 4 query heads, 2 key/value heads
    gm = randomize(graft(model, parse_recipe(prompt_recipe())))
    inputs = example_inputs(model, 2, 9)
    ours = logits(gm, inputs)
    assert (ours - logits(model, inputs)).abs().max() > 1e-2
    out = export_peft(gm, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "adapter_len", "adapter_layers", "target_modules", "task_type")} == {
        "peft_type": "ADAPTION_PROMPT", "adapter_len": 3, "adapter_layers": 2, "target_modules": "self_attn",
        "task_type": "CAUSAL_LM"}
    default = get_peft_model(tiny_model(arch, num_hidden_layers=3),
                             AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    assert saved_layout(out) == peft_layout(default) == {
        f"base_model.model.model.layers.{i}.self_attn.{name}": shape
        for i in (1, 2) for name, shape in (("adaption_prompt", (1, 3, 32)), ("adaption_gate", (1,)))}
    loaded = PeftModel.from_pretrained(tiny_model(arch, num_hidden_layers=3), str(out)).eval()
    torch.testing.assert_close(logits(loaded, inputs), ours, atol=ATOL, rtol=0)


def test_peft_adaption_prompt_imports_exactly(tmp_path):
    peft_model = randomize(get_peft_model(tiny_model("llama", num_hidden_layers=3), AdaptionPromptConfig(
        adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    inputs = example_inputs(peft_model, 2, 9)
    gm = import_peft(tiny_model("llama", num_hidden_layers=3), tmp_path / "peft").eval()
    rule = gm.recipe.rules[0]
    assert rule.match.model_dump(exclude_defaults=True) == {"op": "attention", "layers": {"last": 2}}
    assert (rule.adapter.kind, rule.adapter.prompt, rule.adapter.gate, rule.adapter.mode, rule.adapter.length) == (
        "gated_prompt", "linear", "scalar", "gated", 4)
    assert [s.path for s in gm.plans[0].sites] == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    torch.testing.assert_close(logits(gm, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("options,match,message", [
    ("gate: per_head_tanh", None, "gate 'per_head_tanh' .*one scalar gate per layer, used without tanh"),
    ("gate: adapt", None, "gate 'adapt' .*query-dependent"),
    ("gate: scalar, prompt: hypernetwork, hidden: 4", None, "prompt 'hypernetwork' .*not a network generating it"),
    ("mode: prefix", None, "mode 'prefix'"),
    ("gate: scalar", "{op: attention, layers: {first: 1}}", r"prompts the last adapter_layers .*layers \[0\] of 3"),
])
def test_gated_prompt_export_refuses_other_forms(tmp_path, options, match, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prefix mode warns that a gate does nothing
        gm = graft(tiny_model("llama", num_hidden_layers=3), parse_recipe(prompt_recipe(options, match or
                                                                                        "{op: attention}")))
    with pytest.raises(GraftrError, match=message):
        export_peft(gm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_o_proj_bias_is_refused_both_ways(tmp_path):
    """With an o_proj bias PEFT adds o_proj(branch) = W·branch + b after o_proj: the bias twice."""
    biased = tiny_model("llama", num_hidden_layers=3, attention_bias=True)
    gm = graft(biased, parse_recipe(prompt_recipe()))
    message = "o_proj has a bias; PEFT's AdaptionPrompt adds o_proj\\(branch\\) after o_proj, so it adds the bias twice"
    with pytest.raises(GraftrError, match=message):
        export_peft(gm, tmp_path / "x")
    peft_model = get_peft_model(tiny_model("llama", num_hidden_layers=3, attention_bias=True),
                                AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    inputs = example_inputs(biased, 1, 5)
    assert not torch.allclose(logits(peft_model, inputs), logits(biased, inputs))  # gate 0 is not the identity
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(GraftrError, match=message):
        import_peft(tiny_model("llama", num_hidden_layers=3, attention_bias=True), tmp_path / "peft")


def test_gpt2_adaption_prompt_is_a_different_model_and_refused(tmp_path):
    """PEFT's GPT-2 AdaptionPrompt adds gate·softmax(S_p)·V_p after c_proj without projecting it (checked here with
    hooks, exactly), so it is not graftr's gated prompt (which differs from it numerically): refused both ways."""
    peft_model = randomize(get_peft_model(tiny_model("gpt2", n_layer=3), AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")))
    inputs = example_inputs(peft_model, 2, 7)
    theirs = logits(peft_model, inputs)

    def unprojected_branch(i):
        wrapper = peft_model.get_submodule(f"base_model.model.transformer.h.{i}.attn")

        def hook(attn, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            heads = lambda t: t.unflatten(-1, (4, 8)).transpose(-3, -2)
            q = heads(attn.c_attn(x).split(32, dim=-1)[0])
            _, k, v = (heads(t) for t in attn.c_attn(wrapper.adaption_prompt[0]).split(32, dim=-1))
            branch = wrapper.adaption_gate * torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
            return (out[0] + branch.transpose(1, 2).flatten(2), *out[1:])  # after c_proj, never through it
        return hook

    reference = tiny_model("gpt2", n_layer=3)
    for i in (1, 2):
        reference.transformer.h[i].attn.register_forward_hook(unprojected_branch(i), with_kwargs=True)
    torch.testing.assert_close(logits(reference, inputs), theirs, atol=1e-6, rtol=0)

    gm = graft(tiny_model("gpt2", n_layer=3), parse_recipe(prompt_recipe()))
    with torch.no_grad():
        for i in (1, 2):
            wrapper = peft_model.get_submodule(f"base_model.model.transformer.h.{i}.attn")
            gm.get_submodule(f"transformer.h.{i}.attn.gp").prompt.copy_(wrapper.adaption_prompt[0])
            gm.get_submodule(f"transformer.h.{i}.attn.gp").gate.copy_(wrapper.adaption_gate)
    assert (logits(gm.eval(), inputs) - theirs).abs().max() > 1e-2  # same tensors, another model
    message = "PEFT's GPT-2 AdaptionPrompt .* after c_proj without projecting it through c_proj"
    with pytest.raises(GraftrError, match=message):
        export_peft(gm, tmp_path / "x")
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(GraftrError, match=message):
        import_peft(tiny_model("gpt2", n_layer=3), tmp_path / "peft")


# ---- the command line --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """A tiny llama base directory (with the offline tokenizer) and trained adapters made on it."""
    root = tmp_path_factory.mktemp("export")
    model = model_dir(root / "base", "llama", num_hidden_layers=3)
    recipes = {
        "ia3": ia3_recipe(*IA3_TARGETS["llama"]),
        "prompt": prompt_recipe(),
        "tanh": prompt_recipe("gate: per_head_tanh"),
        "ina": """
name: ina
rules: [{name: ina, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, adapter: {kind: ina, inhibition: 0.3}}]
""",
        "mixed": ia3_recipe(*IA3_TARGETS["llama"]).replace("kind: ia3, scale: input", "kind: ina"),
    }
    adapters = {name: randomize_and_save(graft(model, parse_recipe(text)), root / name)
                for name, text in recipes.items()}
    return root, model, adapters


def test_cli_export_ia3_and_adaption_prompt(on_disk, tmp_path):
    root, model, adapters = on_disk
    inputs = example_inputs(model, 2, 9)
    for name in ("ia3", "prompt"):
        assert cli.main(["export", str(root / name), "--format", "peft", "--out", str(tmp_path / name)]) == 0
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(root / "base")  # the base recorded in the adapter
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(tmp_path / name))
        torch.testing.assert_close(logits(loaded.eval(), inputs), logits(adapters[name], inputs), atol=ATOL, rtol=0)


def test_cli_export_ina_is_the_published_format(on_disk, tmp_path, capsys):
    root, model, adapters = on_disk
    capsys.readouterr()
    assert cli.main(["export", str(root / "ina"), "--model", str(root / "base"), "--out", str(tmp_path / "ina")]) == 0
    assert "stock PEFT ignores this field and would run plain LoRA" in capsys.readouterr().out
    config = json.loads((tmp_path / "ina" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["lora_inhibition"], config["target_modules"]) == ("LORA", 0.3,
                                                                                          ["q_proj", "v_proj"])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved_layout(tmp_path / "ina"))
    inputs = example_inputs(model, 2, 9)
    gm = import_peft(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "ina").eval()
    torch.testing.assert_close(logits(gm, inputs), logits(adapters["ina"], inputs), atol=ATOL, rtol=0)


def test_cli_export_errors(on_disk, tmp_path, capsys):
    root, _, _ = on_disk
    model_dir(tmp_path / "gpt2", "gpt2")
    model_dir(tmp_path / "wide", "llama", num_hidden_layers=3, hidden_size=64)
    get_peft_model(tiny_model("llama"), IA3Config(task_type="CAUSAL_LM")).save_pretrained(str(tmp_path / "peft"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        ([str(tmp_path / "missing"), *out], "adapter directory .*missing does not exist"),
        ([str(root / "ia3"), "--model", str(tmp_path / "gpt2"), *out], "was made for a llama model"),
        ([str(root / "ia3"), "--model", str(tmp_path / "wide"), *out], "hidden_size: adapter 32 vs model 64"),
        ([str(root / "tanh"), *out], "gate 'per_head_tanh'"),
        ([str(root / "mixed"), *out], r"one kind among gated_prompt, ia3, ina(, \w+)*; this model has ia3, ina"),
        ([str(tmp_path / "peft"), "--format", "peft", *out], "is already a PEFT adapter"),
        ([str(root / "ia3"), "--out", str(tmp_path / "taken")], "exists and is not a graftr output directory"),
    ]
    for argv, message in cases:
        assert re.search(message, cli_error(capsys, ["export", *argv])), message
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_peft_directories_as_adapter(on_disk, tmp_path, capsys):
    """A PEFT directory (detected by adapter_config.json without manifest.json) works for merge and generate, and
    a non-mergeable one is refused with the reason."""
    root, model, adapters = on_disk
    for name in ("ia3", "prompt"):
        assert cli.main(["export", str(root / name), "--out", str(tmp_path / name)]) == 0
    assert cli.main(["merge", str(tmp_path / "ia3"), "--out", str(tmp_path / "merged")]) == 0  # base from the config
    inputs = example_inputs(model, 2, 9)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, inputs), logits(adapters["ia3"], inputs), atol=ATOL, rtol=0)
    assert "attention adapters cannot be merged" in cli_error(capsys, ["merge", str(tmp_path / "prompt"), "--out",
                                                                       str(tmp_path / "no")])
    texts = []
    for adapter in (root / "prompt", tmp_path / "prompt"):
        capsys.readouterr()
        assert cli.main(["generate", "--adapter", str(adapter), "--prompt", "hello there", "--max-new-tokens",
                         "5", "--no-template"]) == 0
        texts.append(capsys.readouterr().out.splitlines()[-1])
    assert texts[0] == texts[1]
