"""Named adapters (graftr.named): several adapters in one grafted model, switched without re-tracing, each computing
exactly what it computes loaded alone; disable_adapter() gives the base model; deleting frees the parameters;
saving writes each adapter to its own directory; the CLI runs each of several --adapter in turn."""

from __future__ import annotations

import gc
import re
import weakref

import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize_and_save
from transformers import LlamaForCausalLM

from graftr import GraftedModel, cli, graft, load_adapter, prepare
from graftr.errors import GraftrError, MergeError
from graftr.generate import generate_ids
from graftr.recipe import parse_recipe

IA3 = """
name: ia3_kv_down
rules:
  - {name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
  - {name: ia3_ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3}}
train: {lr: 1.0e-3, max_steps: 1, data: {format: alpaca}}
"""
INA = """
name: ina_q_down
rules:
  - {name: ina_q, match: {path: "model.layers.*.self_attn.q_proj"}, adapter: {kind: ina, rank: 4, inhibition: 0.0}}
  - {name: ia3_ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3}}
train: {lr: 1.0e-3, max_steps: 1, data: {format: alpaca}}
"""
PROMPT = """
name: prompts
rules:
  - name: llama_adapter
    match: {op: attention, layers: {last: 1}}
    adapter: {kind: gated_prompt, length: 3, prompt: linear, gate: per_head_tanh}
"""
# IA3's then INA's rules: the two adapters active together (INA's ia3_ff renamed, a recipe's rule names are unique)
BOTH = IA3.split("train:")[0] + INA.split("rules:\n")[1].split("train:")[0].replace("ia3_ff,", "ia3_ff_b,")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama saved with its tokenizer, and two adapters for it saved with their tensors moved from init."""
    root = tmp_path_factory.mktemp("named")
    model = model_dir(root / "base", "llama")
    randomize_and_save(graft(model, parse_recipe(IA3)), root / "a")
    torch.manual_seed(1)
    b = graft(model, parse_recipe(INA))
    with torch.no_grad():
        for p in b.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    b.save_pretrained(root / "b")
    return root


def fresh(root) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(root / "base"))


def two(root) -> GraftedModel:
    """The base with adapter a as "default" and adapter b as "b"."""
    gm = load_adapter(fresh(root), root / "a")
    gm.load_adapter(root / "b", adapter_name="b")
    return gm.eval()


IDS = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))


def test_each_adapter_computes_what_it_computes_loaded_alone(saved):
    alone_a = GraftedModel.from_pretrained(saved / "a")(IDS).logits
    alone_b = GraftedModel.from_pretrained(saved / "b")(IDS).logits
    base = prepare(fresh(saved)).eval()(IDS).logits
    gm = two(saved)
    graph, code = gm.graph, gm.code
    assert gm.active_adapters == ["default"] and gm.active_adapter == "default" and list(gm.recipes) == ["default", "b"]
    names = [n for n, _ in gm.named_parameters() if ".ina_q" in n or ".ia3_" in n]
    assert len(names) == 2 * 3 + 2 * 3  # a: k, v, down in 2 layers; b: q (A, B) and down in 2 layers
    assert "model.layers.0.self_attn.k_proj.ia3_kv.ia3_l" in names  # the default adapter keeps graftr's names
    assert {n for n in names if "@" in n} == {f"model.layers.{i}.{p}" for i in (0, 1) for p in (
        "self_attn.q_proj.ina_q@b.lora_A", "self_attn.q_proj.ina_q@b.lora_B", "mlp.down_proj.ia3_ff@b.ia3_l")}
    assert torch.equal(gm(IDS).logits, alone_a)
    gm.set_adapter("b")
    assert gm.active_adapters == ["b"] and torch.equal(gm(IDS).logits, alone_b)
    gm.set_adapter("default")
    assert torch.equal(gm(IDS).logits, alone_a)
    assert gm.graph is graph and gm.code == code  # switched by flags: no re-trace, no recompile
    with gm.disable_adapter():
        assert gm.active_adapters == ["default"]
        torch.testing.assert_close(gm(IDS).logits, base, atol=1e-6, rtol=0)
        assert torch.equal(gm(IDS).logits, base)  # exactly: every adapter node passes its site's value through
    assert torch.equal(gm(IDS).logits, alone_a)
    # a PEFT adapter directory loads under a name too (translated on the base built on meta)
    from graftr.formats.peft import export_peft

    export_peft(GraftedModel.from_pretrained(saved / "a"), saved / "a_peft", force=True)
    gm.load_adapter(saved / "a_peft", "p")
    gm.set_adapter("p")
    assert all("@p." in name for name in gm.adapter_state_dict("p"))
    assert torch.equal(gm(IDS).logits, alone_a)


def test_several_active_adapters_apply_in_the_order_they_were_added(saved):
    """Both active: exactly one model grafted with a's rules then b's, holding the same tensors."""
    gm = two(saved)
    gm.set_adapter(["b", "default"])
    assert gm.active_adapters == ["default", "b"] and gm.active_adapter == ["default", "b"]
    combined = graft(fresh(saved), parse_recipe(BOTH)).eval()
    tensors = {**gm.adapter_state_dict("default"),
               **{n.replace("ia3_ff@b", "ia3_ff_b").replace("@b", ""): t
                  for n, t in gm.adapter_state_dict("b").items()}}
    loaded = combined.load_state_dict(tensors, strict=False)
    assert loaded.unexpected_keys == [] and not set(loaded.missing_keys) & set(combined.adapter_state_dict())
    assert torch.equal(gm(IDS).logits, combined(IDS).logits)
    gm.set_adapter([])
    with gm.disable_adapter():
        expected = gm(IDS).logits
    assert torch.equal(gm(IDS).logits, expected)


def test_training_updates_the_active_adapter_only(saved):
    gm = two(saved).train()
    # the first adapter trains, as graft makes it; one loaded by name is frozen unless is_trainable (PEFT)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == set(gm.adapter_state_dict("default"))
    gm.set_adapter("b")
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == set(gm.adapter_state_dict("b"))
    before = {n: t.clone() for n, t in gm.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        gm(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, t in gm.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == trainable
    gm.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in gm.parameters())


def test_delete_adapter_frees_its_parameters(saved):
    gm = two(saved)
    alone_a = load_adapter(fresh(saved), saved / "a").eval()
    b_params = gm.adapter_state_dict("b")
    probe = weakref.ref(next(iter(b_params.values())))
    gm.set_adapter("b")
    gm.delete_adapter("b")
    del b_params
    gc.collect()
    assert probe() is None  # nothing holds the deleted adapter's tensors
    assert list(gm.state_dict()) == list(alone_a.state_dict())
    assert not any("@" in name for name, _ in gm.named_modules())
    assert "@" not in gm.code and list(gm.recipes) == ["default"]
    assert gm.active_adapters == ["default"]  # the only active one was deleted: the first remaining (PEFT)
    assert torch.equal(gm(IDS).logits, alone_a(IDS).logits)
    gm.graph.lint()
    sites = [s for s in gm.site_index.linear if s.adapters]
    assert sorted(s.path.split(".", 3)[-1] for s in sites) == sorted(["self_attn.k_proj", "self_attn.v_proj",
                                                                       "mlp.down_proj"] * 2)
    # a gated prompt (an attention kind) is switched off and deleted the same way
    gm.add_adapter("prompts", parse_recipe(PROMPT))
    with torch.no_grad():
        for p in gm.adapter_state_dict("prompts").values():
            p.add_(0.5)  # gates away from 0: the prompts change the outputs while active
    gm.set_adapter("prompts")
    assert not torch.equal(gm(IDS).logits, prepare(fresh(saved)).eval()(IDS).logits)
    gm.delete_adapter("prompts")
    assert torch.equal(gm(IDS).logits, alone_a(IDS).logits) and list(gm.recipes) == ["default"]
    with pytest.raises(GraftrError, match="no adapter named 'b'"):
        gm.delete_adapter("b")


def test_save_pretrained_writes_each_adapter_to_its_own_directory(saved, tmp_path):
    gm = two(saved)
    gm.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter.safetensors", "b", "manifest.json",
                                                                      "recipe.yaml"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "out" / "b" / "adapter.safetensors"))
    assert sorted(tensors) == sorted(load_file(str(saved / "b" / "adapter.safetensors")))  # the plain names
    for which in ("a", "b"):
        out = tmp_path / "out" / ("b" if which == "b" else "")
        again = GraftedModel.from_pretrained(out)  # an ordinary adapter directory, loadable alone
        assert torch.equal(again(IDS).logits, GraftedModel.from_pretrained(saved / which)(IDS).logits)
    gm.save_pretrained(tmp_path / "only", selected_adapters=["b"])
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["b"]
    from graftr import save_adapter

    with pytest.raises(GraftrError, match="holds the adapters default, b; name the one to save"):
        save_adapter(gm, tmp_path / "x")


def test_generation_outlining_and_merging_with_several_adapters(saved):
    gm = two(saved)
    alone_b = GraftedModel.from_pretrained(saved / "b")
    mask = torch.ones_like(IDS)
    gm.set_adapter("b")
    ours = generate_ids(gm, IDS, mask, max_new_tokens=5, eos_token_ids=[], pad_token_id=0)
    theirs = generate_ids(alone_b, IDS, mask, max_new_tokens=5, eos_token_ids=[], pad_token_id=0)
    assert ours.cached and torch.equal(ours.tokens, theirs.tokens)  # the KV cache graph, adapter b active
    gm.gradient_checkpointing_enable()  # outlines the layers; switching still works there
    for name, which in (("default", "a"), ("b", "b")):
        gm.set_adapter(name)
        assert torch.equal(gm(IDS).logits, GraftedModel.from_pretrained(saved / which)(IDS).logits)
    with pytest.raises(GraftrError, match="outlined"):
        gm.delete_adapter("b")
    gm.gradient_checkpointing_disable()
    gm.set_adapter("b")
    merged = gm.merge_()  # b folded in, the inactive default dropped (PEFT's merge_and_unload)
    assert merged.recipes == {} and merged.active_adapters == []
    torch.testing.assert_close(merged(IDS).logits, alone_b(IDS).logits, atol=1e-5, rtol=1e-5)
    assert list(merged.state_dict()) == list(prepare(fresh(saved)).state_dict())


def test_what_cannot_coexist_is_refused(saved, tmp_path):
    gm = two(saved)
    with pytest.raises(GraftrError, match="already has an adapter named 'b'"):
        gm.load_adapter(saved / "b", adapter_name="b")
    with pytest.raises(GraftrError, match=re.escape("adapter name 'x.y': use letters, digits, _ and -")):
        gm.add_adapter("x.y", parse_recipe(IA3))
    with pytest.raises(GraftrError, match="no adapter named 'c'"):
        gm.set_adapter("c")
    head = parse_recipe(IA3.replace("rules:", "trainable_modules: [lm_head]\nrules:"))
    with pytest.raises(GraftrError, match=r"trains base modules in place \(trainable_modules: lm_head\)"):
        gm.add_adapter("h", head)
    alone = graft(fresh(saved), head)
    with pytest.raises(GraftrError, match="disable_adapter\\(\\) cannot give the base model"):
        with alone.disable_adapter():
            pass
    with pytest.raises(GraftrError, match="trains base modules in place .*; it cannot be switched off"):
        alone.set_adapter([])
    with pytest.raises(GraftrError, match="holds one adapter; this model holds default, b"):
        from graftr.formats.peft import export_peft

        export_peft(gm, tmp_path / "peft")
    prefix = parse_recipe(PROMPT.replace("gate: per_head_tanh}", "gate: per_head_tanh, mode: prefix}"))
    gm.add_adapter("prefix", prefix)
    with torch.no_grad():
        logits = gm(IDS).logits  # off: the attention reads its own keys, values and (now explicit) causal mask
    torch.testing.assert_close(logits, GraftedModel.from_pretrained(saved / "a")(IDS).logits, atol=1e-6, rtol=0)
    with pytest.raises(GraftrError, match="cannot delete adapter 'prefix'.*switch them off instead"):
        gm.delete_adapter("prefix")
    with pytest.raises(MergeError, match="an inactive adapter is not merged"):
        gm.merge_()


def test_cli_runs_each_adapter_in_turn(saved, capsys):
    """graftr generate/eval with several --adapter: one base, each adapter's output under its path."""
    import json

    (saved / "data").mkdir(exist_ok=True)
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    for split in ("train", "validation"):
        (saved / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    argv = ["--adapter", str(saved / "a"), "--adapter", str(saved / "b")]
    assert cli.main(["generate", *argv, "--prompt", "Name a colour.", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    from graftr.generate import generate_text
    from after_training_kit import tokenizer

    for adapter in ("a", "b"):
        alone = GraftedModel.from_pretrained(saved / adapter)
        text, _ = generate_text(alone, tokenizer(), ["Name a colour."], max_new_tokens=4, recipe=alone.recipe)
        at = out.index(f"=== {saved / adapter}")
        assert out[at + 1] == text[0]
    assert cli.main(["eval", *argv, "--data", str(saved / "data")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{saved / 'a'} on validation of") == 1 and out.count(f"{saved / 'b'} on validation of") == 1
    from test_evaluate import table_values

    tables = out.split(f"{saved / 'b'} on validation of")
    assert table_values(tables[0])["loss"] != table_values(tables[1])["loss"]
    assert "no split 'x'" in cli_error(capsys, ["eval", *argv, "--data", str(saved / "data"), "--split", "x"])
