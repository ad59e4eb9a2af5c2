"""Tracing keeps HF semantics (outputs, output types, parameter names, train/eval), and models resolve offline."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput, SequenceClassifierOutput

from graftr import models
from graftr.errors import GraftrError
from zoo import ARCHS, example_inputs, param_count, tiny_config, tiny_model, trace

# Shapes other than the (2, 8) example export traces with; batch 3 has right padding.
SHAPES = [(1, 5), (3, 13)]


@functools.cache
def traced(arch: str, task: str | None = None, **overrides):
    """(eager model, graph) for a tiny model, traced once per session."""
    model = tiny_model(arch, task, **overrides)
    return model, trace(model)


def assert_same_outputs(model, gm, batch: int, seq: int) -> None:
    inputs = example_inputs(model, batch, seq)
    with torch.no_grad():
        expected, got = model(**inputs), gm(**inputs)
    assert type(got) is type(expected)
    assert got.keys() and set(got.keys()) <= set(expected.keys())
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_matches_eager(arch):
    model, gm = traced(arch)
    for batch, seq in SHAPES:
        assert_same_outputs(model, gm, batch, seq)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_names_and_state_dict_match_hf(arch):
    """HF's names, and HF's state dict loads strictly: non-persistent buffers (rotary inv_freq, BERT's position_ids,
    Gemma's embed_scale) stay out of it, as in the HF model."""
    model, gm = traced(arch)
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("arch, output_type", [("llama", CausalLMOutputWithPast), ("t5", Seq2SeqLMOutput)])
def test_output_type_kept(arch, output_type):
    model, gm = traced(arch)
    assert isinstance(gm(**example_inputs(model, 2, 4)), output_type)


@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("qwen3", 2), ("gpt2", 4)])
def test_sdpa_groups_key_value_heads_itself(arch, kv_heads):
    # HF's repeat_kv (expand + reshape to H heads) is dropped: SDPA gets the Hkv heads with enable_gqa, so the
    # repeated copies are neither made nor saved for backward; models without GQA keep their graph
    from graftr.trace import SDPA

    _, gm = traced(arch)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SDPA)]
    assert len(sdpa) == 2
    for node in sdpa:
        assert node.args[1].meta["val"].shape[1] == node.args[2].meta["val"].shape[1] == kv_heads
        assert gm.get_submodule(node.target).enable_gqa == (kv_heads < node.args[0].meta["val"].shape[1])
    assert not any(n.target == torch.ops.aten.expand.default and n.args[0].target == torch.ops.aten.unsqueeze.default
                   and n.args[0].args[1] == 2 for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("arch, unpadded", [("llama", {"attn_mask": None, "is_causal": True}),
                                              ("bert", {"attn_mask": None, "is_causal": False})])
def test_unpadded_batches_run_sdpa_without_a_mask(arch, unpadded, monkeypatch):
    # as HF's eager masking does: an all-allowed or exactly causal mask becomes attn_mask=None (+ is_causal); a
    # padded batch keeps its mask; outputs equal the eager model's either way
    import graftr.trace as tracing

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal})
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    model, gm = traced(arch)
    inputs = example_inputs(model, 3, 9)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    monkeypatch.setattr(tracing.F, "scaled_dot_product_attention", spy)  # torch.nn.functional's own
    with torch.no_grad():
        expected = model(**inputs).logits
        calls.clear()
        torch.testing.assert_close(gm(**inputs).logits, expected, atol=1e-6, rtol=0)
        assert calls == [unpadded] * 2
        calls.clear()
        inputs["attention_mask"][0, :3] = 0  # padding: the mask stays
        gm(**inputs)
        assert len(calls) == 2 and all(c["attn_mask"] is not None and not c["is_causal"] for c in calls)


def test_encoder_classification():
    model, gm = traced("bert", "seq_cls", num_labels=3)
    for batch, seq in SHAPES:
        assert_same_outputs(model, gm, batch, seq)
    out = gm(**example_inputs(model, 3, 13))
    assert isinstance(out, SequenceClassifierOutput) and out.logits.shape == (3, 3)


def test_train_makes_dropout_stochastic_and_eval_deterministic():
    model, gm = traced("bert", hidden_dropout_prob=0.1)
    inputs = example_inputs(model, 3, 13)
    with torch.no_grad():
        gm.train()
        first, second = gm(**inputs).logits, gm(**inputs).logits
        assert not torch.equal(first, second)
        gm.eval()
        first, second = gm(**inputs).logits, gm(**inputs).logits
        assert torch.equal(first, second)
        torch.testing.assert_close(first, model(**inputs).logits, atol=1e-6, rtol=0)


def test_sequence_longer_than_max_positions_is_refused():
    model, gm = traced("llama")
    assert gm.graftr_max_positions == model.config.max_position_embeddings
    assert_same_outputs(model, gm, 1, gm.graftr_max_positions)
    with pytest.raises(Exception):
        gm(**example_inputs(model, 1, gm.graftr_max_positions + 1))


def test_llama2_7b_snapshot_traces_on_meta():
    model = models.build_model(models.resolve("meta-llama/Llama-2-7b-hf").config)
    assert param_count(model) == 6_738_415_616
    gm = trace(model)
    params = dict(gm.named_parameters())
    assert params.keys() == dict(model.named_parameters()).keys()
    assert all(p.is_meta for p in params.values())


# ---------------------------------------------------------------------------------------------------------------
# resolving models

# Published parameter counts of the snapshot models with their default head: they pin hidden, intermediate,
# layer, head, kv-head and vocabulary sizes all at once.
SNAPSHOT_PARAMS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,  # Mixture-of-Experts: 128 experts, 8 routed per token
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "google/gemma-2-2b": 2_614_341_888,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "openai-community/gpt2": 124_439_808,
    "gpt2": 124_439_808,
    "EleutherAI/pythia-410m": 405_334_016,
    "facebook/opt-1.3b": 1_315_758_080,
    "google-bert/bert-base-uncased": 109_514_298,
    "bert-base-uncased": 109_514_298,
    "google-bert/bert-large-cased": 333_610_308,
    "bert-large-cased": 333_610_308,
    "FacebookAI/roberta-base": 124_697_433,
    "roberta-base": 124_697_433,
    "google-t5/t5-base": 222_903_552,
    "t5-base": 222_903_552,
}
# Vision encoders (multi-modal prompts' image towers): the vision tower's parameters, built the way graftr builds it.
ENCODER_SNAPSHOT_PARAMS = {
    "openai/clip-vit-large-patch14": 303_179_776,
}


def test_every_snapshot_is_checked():
    assert set(models.snapshots()) == set(SNAPSHOT_PARAMS) | set(ENCODER_SNAPSHOT_PARAMS)


@pytest.mark.parametrize("model_id", sorted(ENCODER_SNAPSHOT_PARAMS))
def test_encoder_snapshot_builds_on_meta(model_id):
    from graftr.vision import load_encoder

    encoder = load_encoder(model_id, device=torch.device("meta"), dtype=torch.float32)
    assert param_count(encoder) == ENCODER_SNAPSHOT_PARAMS[model_id]
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("model_id", sorted(SNAPSHOT_PARAMS))
def test_snapshot_builds_on_meta(model_id):
    source = models.resolve(model_id)
    assert source.kind == "snapshot" and source.directory is None and "snapshot" in source.note
    assert param_count(models.build_model(source.config)) == SNAPSHOT_PARAMS[model_id]


def test_resolve_snapshot():
    source = models.resolve("meta-llama/Llama-2-7b-hf")
    assert (source.config.hidden_size, source.config.num_hidden_layers) == (4096, 32)
    assert "meta-llama/Llama-2-7b-hf" in source.note and "snapshot" in source.note
    with pytest.raises(GraftrError, match="only a config"):
        models.load_model(source)
    with pytest.raises(GraftrError):
        models.load_tokenizer(source)


def test_snapshot_ids_are_case_sensitive():
    with pytest.raises(GraftrError):
        models.resolve("GPT2")


def test_unknown_id_lists_snapshots():
    with pytest.raises(GraftrError, match="config.json") as info:
        models.resolve("acme/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert all(model_id in message for model_id in models.snapshots())


def test_resolve_model_directory(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    source = models.resolve(str(tmp_path))
    assert source.kind == "dir" and source.directory == tmp_path
    assert source.config.hidden_size == model.config.hidden_size
    loaded = models.load_model(source)
    assert type(loaded) is type(model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=0, rtol=0)


def test_resolve_hf_cache(tmp_path):
    commit = "0" * 40
    repo = tmp_path / "models--acme--tiny-bert"
    tiny_model("bert").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = models.resolve("acme/tiny-bert", cache_dir=tmp_path)
    assert source.kind == "cache" and source.directory == repo / "snapshots" / commit
    assert models.infer_task(source.config) == "masked_lm"


def test_resolve_config_file(tmp_path):
    tiny_config("t5").save_pretrained(tmp_path)
    source = models.resolve(str(tmp_path / "config.json"))
    assert source.kind == "config_file" and source.directory is None
    assert models.infer_task(source.config) == "seq2seq_lm"
    with pytest.raises(GraftrError, match="only a config"):
        models.load_model(source)


def test_malformed_paths_are_clear_errors(tmp_path):
    with pytest.raises(GraftrError, match="without a config.json"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GraftrError, match="cannot read"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(GraftrError, match="cannot read"):
        models.resolve(str(tmp_path / "config.json"))
    with pytest.raises(GraftrError, match="does not exist"):
        models.resolve(str(tmp_path / "missing" / "config.json"))


@pytest.mark.parametrize("model_id, task", [
    ("meta-llama/Llama-2-7b-hf", "causal_lm"), ("gpt2", "causal_lm"), ("t5-base", "seq2seq_lm"),
    ("bert-base-uncased", "masked_lm"), ("roberta-base", "masked_lm"),
])
def test_infer_task_from_architectures(model_id, task):
    assert models.infer_task(models.resolve(model_id).config) == task


@pytest.mark.parametrize("arch, task", [("llama", "causal_lm"), ("t5", "seq2seq_lm"), ("roberta", "masked_lm")])
def test_infer_task_from_family(arch, task):
    assert models.infer_task(tiny_config(arch)) == task


def test_build_model_heads_and_errors():
    config = tiny_config("qwen2")
    model = models.build_model(config, "token_cls", device="cpu", num_labels=5, dtype=torch.bfloat16)
    assert model.score.weight.shape == (5, config.hidden_size) and model.score.weight.dtype == torch.bfloat16
    assert config.num_labels == 2  # the caller's config is left alone
    with pytest.raises(GraftrError, match="seq2seq_lm"):
        models.build_model(config, "seq2seq_lm")
    with pytest.raises(GraftrError, match="unknown task"):
        models.build_model(config, "captioning")


def test_reused_traces_give_graphs_of_their_own(monkeypatch):
    """``graftr train`` builds its model on meta twice (the memory estimate, then the model its weights go into):
    inside ``reuse_traces`` the second is not traced again, yet each graph is its own (outlining one leaves the other
    flat); a model holding weights is reused only as the same object with the same tensors, and nothing is reused
    outside the block."""
    from graftr.grafted import prepare
    from graftr.materialize import build_empty
    from graftr.outline import outline_layers
    from graftr.trace import reuse_traces

    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tiny_config("llama")
    with reuse_traces():
        first = prepare(build_empty(config, "causal_lm"))
        second = prepare(build_empty(config, "causal_lm"))
        assert len(calls) == 1
        prepare(build_empty(tiny_config("llama", num_hidden_layers=3), "causal_lm"))  # another model
        assert len(calls) == 2
        weighted = tiny_model("llama")
        prepare(weighted)
        prepare(tiny_model("llama"))  # weights: never shared between two models
        assert len(calls) == 4
        again = prepare(weighted)  # the same model, the same tensors
        assert len(calls) == 4 and again.get_parameter("lm_head.weight") is weighted.lm_head.weight
        weighted.lm_head.weight = torch.nn.Parameter(weighted.lm_head.weight.detach().clone())
        prepare(weighted)  # a tensor replaced: traced again
        assert len(calls) == 5
    prepare(build_empty(config, "causal_lm"))
    assert len(calls) == 6
    sites = len(first.site_index.linear)
    outline_layers(first)
    assert first.graftr_outlined and not second.graftr_outlined
    assert first.graph is not second.graph and len(second.site_index.linear) == sites > 0


def test_graftr_train_traces_its_model_once(tmp_path, monkeypatch):
    from after_training_kit import model_dir

    from graftr import cli

    model_dir(tmp_path / "llama", "llama")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps({"text": f"a short line {i}"}) + "\n"
                                                         for i in range(8)))
    (tmp_path / "r.yaml").write_text("name: r\nrules:\n  - {name: ia3, adapter: {kind: ia3}, match: "
                                     "{path: 'model.layers.*.self_attn.v_proj'}}\n"
                                     "train: {max_steps: 1, micro_batch_size: 2}\n")
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    saved = dict(os.environ)  # an in-process run sets the launch variables
    try:
        assert cli.main(["train", str(tmp_path / "r.yaml"), "--model", str(tmp_path / "llama"), "--data",
                         str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert len(calls) == 1
