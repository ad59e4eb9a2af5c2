"""Outlining layers into submodule calls: same outputs, gradients and names; one layer gathered at a time by ZeRO-3.

The ZeRO-3 test runs two CPU processes (gloo) with DeepSpeed. On a machine where DeepSpeed has never run, its
first launch JIT-builds a C++ communication op (~90 s per process) before the test proper (~40 s).
"""

import json
import math
import os
from functools import partial

import pytest
import torch
from torch import fx, nn
from zoo import BERT_CLASSIFIER, IA3_TARGETS, example_inputs, ia3_recipe, tiny_model

from graftr import fxmeta, graft
from graftr.errors import GraftrError
from graftr.outline import outline_layers
from graftr.recipe import parse_recipe
from graftr.registry import kinds
from graftr.sites import layer_of
from graftr.trace import SDPA
from graftr.train.distributed import free_port as _free_port, gathered_adapter_state

LLAMA_IA3 = ia3_recipe(*IA3_TARGETS["llama"])
RECIPES = {
    "llama": LLAMA_IA3,
    "gpt2": ia3_recipe(*IA3_TARGETS["gpt2"]),
    "bert": ia3_recipe(*IA3_TARGETS["bert"], header=BERT_CLASSIFIER),
    "t5": """
name: t
rules:
  - name: ia3_attn
    match: {path: "{encoder,decoder}.block.*.layer.*.{SelfAttention,EncDecAttention}.{k,v}"}
    adapter: {kind: ia3}
  - {name: ia3_ff, match: {path: "{encoder,decoder}.block.*.layer.*.DenseReluDense.wo"}, adapter: {kind: ia3, scale: input}}
""",
}
LAYERS = {
    "llama": ["model.layers.0", "model.layers.1"],
    "gpt2": ["transformer.h.0", "transformer.h.1"],
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "t5": ["decoder.block.0", "decoder.block.1", "encoder.block.0", "encoder.block.1"],
}


def _pair(arch, recipe, **overrides):
    """Two identical grafted models (same seed), adapters randomised so they are not the identity."""
    models = []
    for _ in range(2):
        r = parse_recipe(recipe)
        model = tiny_model(arch, r.task, num_labels=r.num_labels, **overrides) if r.task else tiny_model(arch, **overrides)
        gm = graft(model, r)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in gm.adapter_modules().values():
                for p in module.parameters():
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        models.append((model, gm))
    return models


def _labels(model, inputs):
    if model.config.is_encoder_decoder:
        return inputs["decoder_input_ids"]
    if getattr(model, "num_labels", None) and "ForSequenceClassification" in type(model).__name__:
        return torch.arange(inputs["input_ids"].shape[0]) % model.num_labels
    return inputs["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_outlined_equals_flat(arch):
    (model, flat), (_, out) = _pair(arch, RECIPES[arch])
    names = [n for n, _ in flat.named_parameters()]
    assert outline_layers(out) is out
    assert out.graftr_outlined == LAYERS[arch]

    # the root calls each layer once, at its own path, and reads none of the layers' parameters itself
    calls = [n.target for n in out.graph.nodes if n.op == "call_module" and n.target in LAYERS[arch]]
    assert sorted(calls) == LAYERS[arch]
    assert not [n.target for n in out.graph.nodes if n.op == "get_attr" and layer_of(n.target)]
    for path in LAYERS[arch]:
        layer = out.get_submodule(path)
        assert isinstance(layer, fx.GraphModule)
        layer.graph.lint()
        assert all(not t.startswith(path) for t in (n.target for n in layer.graph.nodes if n.op == "get_attr"))
    adapter = next(t for t in flat.adapter_modules() if t.startswith(LAYERS[arch][1] + "."))
    layer = out.get_submodule(LAYERS[arch][1])
    assert adapter.removeprefix(LAYERS[arch][1] + ".") in [n.target for n in layer.graph.nodes if n.op == "call_module"]

    assert [n for n, _ in out.named_parameters()] == names
    assert list(out.state_dict()) == list(flat.state_dict())
    assert out.adapter_state_dict().keys() == flat.adapter_state_dict().keys()

    for p in [*flat.parameters(), *out.parameters()]:  # the gradient of every tensor, not only the adapters'
        p.requires_grad_(True)
    flat.eval(), out.eval()
    for batch, seq in ((3, 7), (2, 11)):  # dynamic batch and sequence sizes
        inputs = example_inputs(model, batch, seq)
        labels = _labels(model, inputs)
        a, b = flat(**inputs, labels=labels), out(**inputs, labels=labels)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        flat.zero_grad(), out.zero_grad()
        a.loss.backward(), b.loss.backward()
        grads = dict(out.named_parameters())
        for name, p in flat.named_parameters():
            assert torch.equal(p.grad, grads[name].grad), name


def test_train_and_eval_switch_dropout_inside_layers():
    """BERT has dropout in the root (embeddings) and in the layers (attention probabilities, hidden states)."""
    (model, flat), (_, out) = _pair("bert", RECIPES["bert"], hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    outline_layers(out)
    inputs = example_inputs(model, 2, 9)
    with torch.no_grad():
        flat.train(), out.train()
        assert all(m.training for m in out.modules())
        torch.manual_seed(5)
        a = flat(**inputs).logits
        torch.manual_seed(5)
        b = out(**inputs).logits
        assert torch.equal(a, b)  # the random stream is consumed in the same order
        flat.eval(), out.eval()
        assert not any(m.training for m in out.modules())
        assert torch.equal(out(**inputs).logits, out(**inputs).logits)
        assert not torch.allclose(out(**inputs).logits, b)  # dropout did act in training mode
        assert torch.equal(flat(**inputs).logits, out(**inputs).logits)


@pytest.mark.skipif("gated_prompt" not in kinds(), reason="the gated_prompt adapter kind is not registered")
def test_hypernetwork_prompts_shared_by_the_layers_run_in_the_root():
    """Non-linear prompts: one hypernetwork at ``model.layers.prompt`` makes every layer's prompt (gated_prompt)."""
    recipe = """
name: t
rules:
  - {name: prompt, match: {op: attention}, adapter: {kind: gated_prompt, length: 3, prompt: hypernetwork}}
"""
    (model, flat), (_, out) = _pair("llama", recipe)
    assert [p.shared for p in flat.plans] == [["model.layers.prompt"]]
    outline_layers(out)
    assert [n for n, _ in out.named_parameters()] == [n for n, _ in flat.named_parameters()]
    shared = [n for n in out.graph.nodes if n.op == "call_module" and n.target == "model.layers.prompt"]
    layers = [n for n in out.graph.nodes if n.op == "call_module" and n.target in LAYERS["llama"]]
    assert [n.args for n in shared] == [(0,), (1,)]  # one prompt per layer, made in the root ...
    assert [p in layer.args for p, layer in zip(shared, layers)] == [True, True]  # ... and passed in
    inputs = example_inputs(model, 2, 6)
    a, b = flat.eval()(**inputs, labels=inputs["input_ids"]), out.eval()(**inputs, labels=inputs["input_ids"])
    assert torch.equal(a.logits, b.logits)
    a.loss.backward(), b.loss.backward()
    grads = dict(out.named_parameters())
    trainable = [(name, p) for name, p in flat.named_parameters() if p.requires_grad]
    assert trainable and all(torch.equal(p.grad, grads[name].grad) for name, p in trainable)


def _add_shared_module(gm):
    """Install a module shared by all layers at ``model.layers.shared`` and use it inside every layer.

    Each layer adds ``shared(h)`` of its own hidden state to its output.
    """
    layers = gm.get_submodule("model.layers")
    layers.add_module("shared", nn.Linear(32, 32))
    graph = gm.graph
    for i in range(2):
        path = f"model.layers.{i}"
        residual = [n for n in graph.nodes if fxmeta.module_path(n) == path and n.target == torch.ops.aten.add.Tensor][-1]
        with graph.inserting_before(residual.next):
            delta = graph.call_module("model.layers.shared", (residual,))
        with graph.inserting_before(delta.next):
            total = graph.call_function(torch.ops.aten.add.Tensor, (residual, delta))
        residual.replace_all_uses_with(total, delete_user_cb=lambda u: u not in (total, delta))
        for n in (delta, total):
            fxmeta.copy_meta(residual, n)  # tagged as nodes of the layer, like an adapter's graft would
    graph.lint()
    gm.recompile()


def test_shared_module_on_a_layer_value_is_refused():
    """A module outside the layers applied to a layer's own value would need the layer split in two."""
    gm = graft(tiny_model("llama"), parse_recipe(LLAMA_IA3))
    _add_shared_module(gm)
    with pytest.raises(GraftrError, match=r"cannot outline model.layers.0.*'model.layers.shared'"):
        outline_layers(gm)


def test_gathered_adapter_state_without_deepspeed():
    gm = outline_layers(graft(tiny_model("llama"), parse_recipe(LLAMA_IA3)))
    state = gathered_adapter_state(gm)
    expected = gm.adapter_state_dict()
    assert list(state) == list(expected) and len(state) == 6
    for name, t in state.items():
        assert torch.equal(t, expected[name]) and t.data_ptr() != expected[name].data_ptr()


# ---- ZeRO-3: one layer gathered at a time --------------------------------------------------------------------

# Settings that make ZeRO-3 release a parameter as soon as the module that used it returns: no parameter kept
# resident for being small (every parameter of a tiny model is), none fetched ahead for the next module, none kept
# for being reused soon. With the defaults the bound below grows by the prefetch bucket.
ZERO3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
         "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}}
ZERO2 = {**ZERO3, "zero_optimization": {"stage": 2}}


def _zero_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for mode, config in (("flat", ZERO3), ("outlined", ZERO3), ("zero2", ZERO2)):
        model = tiny_model("llama", num_hidden_layers=4)
        gm = graft(model, parse_recipe(LLAMA_IA3)).train()
        if mode != "flat":
            outline_layers(gm)
        base = {n: p for n, p in gm.named_parameters() if not p.requires_grad}
        samples = []  # (layer, names of the base parameters gathered) at every attention call of the forward

        def probe(module, args, output, layer):
            samples.append((layer, [n for n, p in base.items() if p.ds_status == ZeroParamStatus.AVAILABLE]))

        if config is ZERO3:
            for name, module in gm.named_modules():
                if isinstance(module, SDPA):
                    module.register_forward_hook(partial(probe, layer=layer_of(name)[1]))
        trainable = [p for p in gm.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=gm, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
        placeholders = [p.numel() for p in trainable]
        before = gathered_adapter_state(engine)
        inputs = example_inputs(model, 2, 8, seed=rank)
        steps = []
        for _ in range(2):  # the first step records ZeRO's trace, the second fetches by it
            samples.clear()
            loss = engine(**inputs, labels=inputs["input_ids"]).loss
            engine.backward(loss)
            engine.step()
            steps.append({"loss": loss.item(), "samples": list(samples)})
        after = gathered_adapter_state(engine)
        results[mode] = {"steps": steps, "placeholders": placeholders,
                         "before": {n: t.tolist() for n, t in before.items()},
                         "after": {n: t.tolist() for n, t in after.items()},
                         "numel": {n: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in base.items()}}
        engine.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Per rank: a flat ZeRO-3, an outlined ZeRO-3 and an outlined ZeRO-2 run of two steps on a 4-layer Llama."""
    out = tmp_path_factory.mktemp("zero")
    torch.multiprocessing.start_processes(_zero_worker, args=(2, _free_port(), str(out)), nprocs=2,
                                          start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero3_gathers_one_layer_at_a_time(zero_runs):
    numel = zero_runs[0]["flat"]["numel"]
    layer_names = {i: {n for n in numel if n.startswith(f"model.layers.{i}.")} for i in range(4)}
    outside = set(numel) - set().union(*layer_names.values())  # embeddings, final norm, lm_head
    assert sorted(outside) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    total = sum(numel.values())
    one_layer = sum(numel[n] for n in layer_names[0])
    bound = sum(numel[n] for n in outside) + one_layer  # what the root reads + the layer that is running
    assert (total, bound) == (45344, 17504)
    for run in zero_runs:
        for step in run["outlined"]["steps"]:
            assert [layer for layer, _ in step["samples"]] == [0, 1, 2, 3]
            for layer, live in step["samples"]:  # exactly the running layer's parameters, and the root's
                assert set(live) == outside | layer_names[layer]
            assert max(sum(numel[n] for n in live) for _, live in step["samples"]) == bound
        for step in run["flat"]["steps"]:  # the flat graph: everything, for the whole forward
            assert all(set(live) == set(numel) for _, live in step["samples"])
            assert max(sum(numel[n] for n in live) for _, live in step["samples"]) == total


def test_zero_trains_adapters_and_gathers_them_for_saving(zero_runs):
    shapes = {"ia3_attn": 16, "ia3_ff": 64}  # k/v projections out (2 kv heads x 8), down_proj in
    for run in zero_runs:
        assert run["outlined"]["placeholders"] == [0] * 12  # ZeRO-3 parameters hold no data outside forward
        assert run["zero2"]["placeholders"] == [16, 16, 64] * 4
        for mode in ("flat", "outlined", "zero2"):
            before, after = run[mode]["before"], run[mode]["after"]
            assert len(after) == 12
            for name, value in after.items():
                assert len(value) == shapes[name.rsplit(".", 2)[-2]]
                assert before[name] == [1.0] * len(value)  # IA³ starts at ones
                assert value != before[name]  # and the optimizer step changed it
        # the same computation: flat and outlined ZeRO-3, and ZeRO-2, agree
        assert [s["loss"] for s in run["flat"]["steps"]] == [s["loss"] for s in run["outlined"]["steps"]]
        assert run["flat"]["after"] == run["outlined"]["after"]
        for name, value in run["zero2"]["after"].items():
            assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for a, b in zip(value, run["outlined"]["after"][name]))
    assert zero_runs[0]["outlined"]["after"] == zero_runs[1]["outlined"]["after"]  # every rank holds the same state
