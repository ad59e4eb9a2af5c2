"""Merging: the written directory is a plain HF model equal to the grafted one, refusals write nothing."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize_and_save, tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from zoo import BERT_CLASSIFIER, IA3_TARGETS, example_inputs, ia3_recipe, tiny_model

from graftr import cli, graft
from graftr.recipe import parse_recipe
from graftr.registry import kinds

IA3 = {arch: ia3_recipe(*IA3_TARGETS[arch], header=BERT_CLASSIFIER if arch == "bert" else "")
       for arch in ("llama", "gpt2", "bert")}
AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


def trained_adapter(root, arch, recipe, task=None, **overrides):
    """A base model directory and an adapter whose every trainable tensor is moved away from its init.

    The adapter is made on the model loaded from the directory, so it records that directory as its base.
    Returns the base model and the grafted model (the reference the merged model must equal).
    """
    tiny_model(arch, task, **overrides).save_pretrained(root / "base")
    cls = AUTO[arch] if task is None else AutoModelForSequenceClassification
    model = cls.from_pretrained(root / "base").eval()
    gm = randomize_and_save(graft(model, parse_recipe(recipe)), root / "adapter")
    return tiny_model(arch, task, **overrides), gm


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """``merged(arch)``: (directory, base model, grafted model) with ``directory / "merged"`` written by the CLI."""
    root = tmp_path_factory.mktemp("merge")

    @functools.cache
    def make(arch):
        task, overrides = ("seq_cls", {"num_labels": 3}) if arch == "bert" else (None, {})
        model, gm = trained_adapter(root / arch, arch, IA3[arch], task, **overrides)
        tokenizer().save_pretrained(root / arch / "base")
        # no --model: the base recorded in the adapter
        assert cli.main(["merge", str(root / arch / "adapter"), "--out", str(root / arch / "merged")]) == 0
        return root / arch, model, gm

    return make


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merged_directory_equals_grafted_model(arch, merged):
    root, model, gm = merged(arch)
    loaded, info = AUTO[arch].from_pretrained(root / "merged", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    inputs = example_inputs(model, 3, 11)
    with torch.no_grad():
        expected = gm(**inputs).logits
        got = loaded.eval()(**inputs).logits
        assert (expected - model(**inputs).logits).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if arch == "bert":  # the trained head comes from the adapter, with the base's label names
        torch.testing.assert_close(loaded.classifier.weight, gm.get_parameter("classifier.weight"), atol=0, rtol=0)
        assert loaded.config.num_labels == 3


def test_merged_directory_loads_without_graftr(merged):
    root, _, gm = merged("llama")
    text = "hello world"
    assert AutoTokenizer.from_pretrained(root / "merged")(text)["input_ids"] == tokenizer()(text)["input_ids"]
    ids = torch.tensor([[5, 9, 17, 33, 4, 60]])
    with torch.no_grad():
        expected = gm(input_ids=ids).logits
    script = textwrap.dedent(f"""
        import sys
        sys.modules["graftr"] = None  # any import of graftr now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(root / "merged")!r})
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, {str(root / "logits.pt")!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    torch.testing.assert_close(torch.load(root / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_merge_saves_in_the_requested_dtype(merged, tmp_path):
    root, _, _ = merged("gpt2")
    assert cli.main(["merge", str(root / "adapter"), "--model", str(root / "base"), "--out", str(tmp_path / "bf16"),
                     "--dtype", "bfloat16"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16


def test_merge_errors(merged, tmp_path, capsys):
    root, _, _ = merged("llama")
    model_dir(tmp_path / "other", "gpt2")
    out = ["--out", str(tmp_path / "out")]
    adapter = str(root / "adapter")
    assert "does not exist" in cli_error(capsys, ["merge", str(tmp_path / "missing"), *out])
    for model, message in [(tmp_path / "other", "was made for a llama model"),
                           ("meta-llama/Llama-2-7b-hf", "hidden_size: adapter 32 vs model 4096"),
                           (root / "base" / "config.json", "only a config")]:
        assert message in cli_error(capsys, ["merge", adapter, "--model", str(model), *out])
    assert not (tmp_path / "out").exists()


INA = """
name: ina
rules:
  - {{name: ina_qv, match: {{path: "model.layers.*.self_attn.{{q_proj,v_proj}}"}}, adapter: {{kind: ina, rank: 2, inhibition: {p}}}}}
"""


@pytest.mark.skipif("ina" not in kinds(), reason="the ina adapter kind is not registered")
def test_ina_without_inhibition_merges_exactly(tmp_path):
    model, gm = trained_adapter(tmp_path, "llama", INA.format(p=0))
    assert cli.main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        expected = gm(**inputs).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def refused(tmp_path, capsys, recipe, arch="llama"):
    trained_adapter(tmp_path, arch, recipe)
    err = cli_error(capsys, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    return err


@pytest.mark.skipif("ina" not in kinds(), reason="the ina adapter kind is not registered")
def test_ina_with_inhibition_is_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, INA.format(p=0.3))
    assert "model.layers.0.self_attn.q_proj" in err or "inhibition" in err


@pytest.mark.skipif("gated_prompt" not in kinds(), reason="the gated_prompt adapter kind is not registered")
def test_gated_prompts_are_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, """
name: gp
rules: [{name: prompt, match: {op: attention, layers: {last: 1}}, adapter: {kind: gated_prompt}}]
""")
    assert "rule 'prompt' (gated_prompt) attaches to attention blocks: attention adapters cannot be merged" in err


def test_merge_refusal_is_read_from_the_config_alone():
    """What `graftr merge` asks before reading weights: a linear kind that keeps the default check_merge is refused
    by name, one that overrides check_merge is left to it; IA³ merges, InA only with p = 0."""
    from graftr.adapters.ia3 import IA3, IA3Config
    from graftr.adapters.ina import InA, InAConfig
    from graftr.adapters.base import LinearAdapter

    class Plain(LinearAdapter):
        kind = "test_plain"

    class Mergeable(LinearAdapter):
        kind = "test_mergeable"

        def check_merge(self):
            return None

    assert Plain.merge_refusal(None) == "test_plain adapters cannot be merged into the base weights"
    assert Mergeable.merge_refusal(None) is None
    assert IA3.merge_refusal(IA3Config()) is None
    assert InA.merge_refusal(InAConfig(inhibition=0.0)) is None
    assert InA.merge_refusal(InAConfig(inhibition=0.3)).startswith("ina with inhibition 0.3 cannot be merged")


def test_adapter_on_a_tied_weight_is_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, """
name: head
rules: [{name: ia3_head, match: {path: lm_head}, adapter: {kind: ia3}}]
""", arch="gpt2")
    assert "tied" in err


def test_a_branch_after_an_input_scaling_merges_with_the_scaled_input():
    """IA³ input scaling then a LoRA branch on one site: the branch reads the scaled input, so the merged weight is
    (W + s·BA)·diag(l), not W·diag(l) + s·BA (the merge once added the branch unscaled)."""
    text = ("name: m\nrules:\n"
            "  - {name: ff, match: {path: '**.mlp.down_proj'}, adapter: {kind: ia3, scale: input}}\n"
            "  - {name: lo, match: {path: '**.mlp.down_proj'}, adapter: {kind: ina, inhibition: 0, rank: 4}}\n"
            "  - {name: out, match: {path: '**.mlp.down_proj'}, adapter: {kind: ia3}}\n")
    model = tiny_model("llama")
    inputs = example_inputs(model, 2, 6)
    gm = graft(model, parse_recipe(text)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
        want = gm(**inputs).logits
        gm.merge_()
        torch.testing.assert_close(gm(**inputs).logits, want, rtol=1e-5, atol=1e-5)
