"""The quantized frozen base (``quantize:``): a quantized graft computes what the HF model computes on the weights
after bitsandbytes' own quantize→dequantize round trip, adapters on quantized sites see the same input and output,
weights are quantized as they stream from safetensors, every adapter kind trains on it, merge writes a plain HF
model, PEFT export works, bad combinations are one-line errors.
"""

from __future__ import annotations

import copy
import json
import sys

import bitsandbytes.functional as BF
import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize_and_save
from test_train import INSTRUCTIONS, LOWERS, RULES, records, recipe, write_jsonl
from transformers import AutoModelForCausalLM
from zoo import IA3_TARGETS, example_inputs, ia3_recipe, tiny_model

from graftr import cli, graft, quantize
from graftr.errors import GraftrError, MergeError, RecipeError
from graftr.materialize import build_empty, materialize
from graftr.formats.peft import export_peft
from graftr.recipe import parse_recipe
from graftr.sites import find_linear_sites

TARGETS = {"llama": IA3_TARGETS["llama"], "gpt2": IA3_TARGETS["gpt2"]}
# linear sites inside the layer stacks of the tiny models (2 layers): what the pass quantizes, exactly
QUANTIZED = {"llama": 14, "gpt2": 8}
INA = {"llama": "model.layers.*.mlp.up_proj", "gpt2": "transformer.h.*.mlp.c_fc"}


def quant_recipe(arch: str, quantize_section: str | None) -> str:
    """IA³ output and input scaling plus an InA branch, optionally on a quantized base."""
    text = ia3_recipe(*TARGETS[arch]) + (
        f'  - {{name: ina, match: {{path: "{INA[arch]}"}}, adapter: {{kind: ina, rank: 4, inhibition: 0.3}}}}\n')
    return text + (f"quantize: {quantize_section}\n" if quantize_section else "")


def bnb_round_trip(weight: torch.Tensor, method: str, layout: str, blocksize=64, double_quant=False) -> torch.Tensor:
    """bitsandbytes' own quantize → dequantize of an HF weight (Conv1D's is (in, out): quantized as (out, in))."""
    w = weight.t().contiguous() if layout == "in_out" else weight
    if method == "int8":
        q, scale, _ = BF.int8_vectorwise_quant(w)
        rt = BF.int8_vectorwise_dequant(q, scale).to(w.dtype)
    else:
        q, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=method, compress_statistics=double_quant)
        rt = BF.dequantize_4bit(q, state)
    return rt.t().contiguous() if layout == "in_out" else rt


def randomize(gm, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    return gm.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---- equality with bitsandbytes' round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_graft_equals_hf_on_round_tripped_weights(arch, method):
    model = tiny_model(arch, "causal_lm")
    reference = copy.deepcopy(model)
    gm = graft(model, parse_recipe(quant_recipe(arch, f"{{method: {method}, compute_dtype: float32}}")))
    quantized = [s for s in gm.site_index.linear if s.quant]
    assert len(quantized) == QUANTIZED[arch] and {s.quant for s in quantized} == {method}
    assert not any(s.quant for s in gm.site_index.linear if s.layer is None)  # the head stays dense
    layouts = {"llama": "out_in", "gpt2": "in_out"}  # nn.Linear's (out, in), GPT-2 Conv1D's (in, out)
    with torch.no_grad():
        for site in quantized:
            w = reference.get_parameter(site.weight)
            w.copy_(bnb_round_trip(w, method, layouts[arch]))
    inputs = example_inputs(model, 3, 10)
    assert torch.equal(logits(gm.eval(), inputs), logits(reference, inputs))  # adapters at init: the base
    # the re-found sites are the ones the pass left: same paths, quantized
    assert {(s.path, s.quant) for s in find_linear_sites(gm)} == {(s.path, s.quant) for s in gm.site_index.linear}

    # trained adapters on quantized sites see what they see on the same (round-tripped) weights in full precision
    randomize(gm)
    dense = graft(reference, parse_recipe(quant_recipe(arch, None)))
    with torch.no_grad():
        for name, p in dense.adapter_state_dict().items():
            p.copy_(gm.get_parameter(name))
    assert torch.equal(logits(gm, inputs), logits(dense.eval(), inputs))
    assert not torch.equal(logits(gm, inputs), logits(reference, inputs))


def test_double_quant_and_blocksize_follow_bitsandbytes():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    gm = graft(model, parse_recipe(quant_recipe("llama", "{method: nf4, double_quant: true, blocksize: 128}")))
    with torch.no_grad():
        for site in (s for s in gm.site_index.linear if s.quant):
            w = reference.get_parameter(site.weight)
            w.copy_(bnb_round_trip(w, "nf4", "out_in", blocksize=128, double_quant=True))
    holder = gm.get_submodule("model.layers.0.mlp.up_proj")
    assert holder.weight_absmax.dtype == torch.uint8 and holder.weight_absmax.numel() == 64 * 32 // 128
    inputs = example_inputs(model, 2, 9)
    assert torch.equal(logits(gm.eval(), inputs), logits(reference, inputs))


def test_gradient_reaches_the_input_and_no_dense_weight_is_saved():
    """Backward through a quantized site: the input's gradient is the dense one's on the round-tripped weight;
    autograd keeps the packed weight (uint8), never a dense copy of it."""
    gm = graft(tiny_model("llama"), parse_recipe(quant_recipe("llama", "{method: nf4}")))
    site = gm.site_index.linear[0]
    holder = gm.get_submodule(site.path)
    dense = bnb_round_trip(tiny_model("llama").get_parameter(site.weight), "nf4", "out_in")
    x = torch.randn(2, 5, site.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = quantize.linear_4bit(x, holder.weight, holder.weight_absmax, None, None, None, None, "nf4",
                                   [site.out_features, site.in_features], 64, None)
    torch.testing.assert_close(out, x @ dense.t(), atol=1e-6, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 5, site.out_features) @ dense, atol=1e-6, rtol=0)
    assert saved and not any(t.is_floating_point() and t.numel() >= site.out_features * site.in_features
                             for t in saved)


# ---- streaming from safetensors ------------------------------------------------------------------------------------
def test_weights_are_quantized_as_they_stream(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    recipe = parse_recipe(quant_recipe("llama", "{method: nf4, double_quant: true}"))
    in_place = graft(copy.deepcopy(model), recipe)
    stored = []
    real = quantize.store
    monkeypatch.setattr(quantize, "store", lambda gm, spec, dense: stored.append(spec.weight) or real(gm, spec, dense))
    streamed = graft(build_empty(model.config, "causal_lm"), recipe)
    assert all(b.is_meta for b in streamed.get_submodule("model.layers.1.mlp.down_proj").buffers())
    report = materialize(streamed, tmp_path / "base")
    assert report == [] and len(stored) == QUANTIZED["llama"]
    for name, buffer in in_place.named_buffers():
        assert torch.equal(streamed.get_buffer(name), buffer), name
    with torch.no_grad():
        for name, p in streamed.adapter_state_dict().items():
            p.copy_(in_place.get_parameter(name))
    inputs = example_inputs(model, 2, 9)
    assert torch.equal(logits(streamed.eval(), inputs), logits(in_place.eval(), inputs))
    # the packed storage is in no state dict (checkpoints, saved adapters): only the dense weights' names are gone
    assert not any(name in streamed.state_dict() for name in quantize.storage_names(streamed))
    assert streamed.trainable_counts()[1] == sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for p in streamed.adapter_state_dict().values())


# ---- training -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model_dir(root / "llama", "llama")
    write_jsonl(root / "alpaca.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS])
    return root


QUANTIZE_HEAD = "quantize: {method: nf4, double_quant: true}\n"


@pytest.mark.parametrize("kind", list(RULES))
def test_every_kind_trains_on_a_quantized_base(root, tmp_path, capsys, kind):
    path = recipe(tmp_path / f"{kind}.yaml", [RULES[kind]], LOWERS, head=QUANTIZE_HEAD)
    capsys.readouterr()
    assert cli.main(["train", path, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl"),
                     "--out", str(tmp_path / "run")]) == 0
    assert "quantized 14 linear sites (nf4)" in capsys.readouterr().out
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.01


def test_resume_and_zero_stages_on_a_quantized_base(root, tmp_path, capsys):
    """ZeRO-0 trains as ZeRO-2 does; stopped at step 2 and resumed to 4 equals 4 steps straight."""
    path = recipe(tmp_path / "r.yaml", [RULES["ina"]], LOWERS.replace("max_steps: 6", "max_steps: 4")
                  + "save_every: 2\n", head=QUANTIZE_HEAD)
    args = [path, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl")]
    runs = {}
    for stage in (0, 2):
        assert cli.main(["train", *args, "--out", str(tmp_path / f"z{stage}"), f"train.zero_stage={stage}"]) == 0
        runs[stage] = [r["loss"] for r in records(tmp_path / f"z{stage}")]
    assert runs[0] == pytest.approx(runs[2], abs=1e-5)
    assert cli.main(["train", *args, "--out", str(tmp_path / "part"), "train.max_steps=2"]) == 0
    assert cli.main(["train", *args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert [r["loss"] for r in records(tmp_path / "part")] == pytest.approx(runs[2], abs=1e-6)
    a = json.loads((tmp_path / "part" / "adapter" / "manifest.json").read_text())["training"]["steps"]
    assert a == 4


def test_zero3_and_other_bad_combinations_are_one_line_errors(root, tmp_path, capsys):
    path = recipe(tmp_path / "z3.yaml", [RULES["ia3"]], LOWERS + "zero_stage: 3\n", head=QUANTIZE_HEAD)
    message = cli_error(capsys, ["train", path, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl")])
    assert "z3.yaml:" in message and "train.zero_stage" in message and "zero_stage 3 cannot train on a quantized" \
        in message
    # the override path reports it too
    ok = recipe(tmp_path / "ok.yaml", [RULES["ia3"]], LOWERS, head=QUANTIZE_HEAD)
    message = cli_error(capsys, ["train", ok, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl"),
                                 "train.zero_stage=3"])
    assert "zero_stage 3 cannot train on a quantized" in message
    trained_head = recipe(tmp_path / "head.yaml", [RULES["ia3"]], LOWERS,
                          head=QUANTIZE_HEAD + "trainable_modules: [model.layers.0.mlp]\n")
    message = cli_error(capsys, ["train", trained_head, "--model", str(root / "llama"), "--data",
                                 str(root / "alpaca.jsonl")])
    assert "trainable_modules trains model.layers.0.mlp" in message and "quantize.skip" in message


RECIPE_ERRORS = [
    ("quantize: {method: nf3}", "quantize.method"),
    ("quantize: {method: int8, blocksize: 128}", "blocksize only apply to the 4-bit methods"),
    ("quantize: {method: nf4, blocksize: 100}", "quantize.blocksize"),
    ("quantize: {method: nf4, skip: '[a'}", "quantize.skip"),
    ("quantize: {method: nf4, compute: float32}", "quantize.compute"),
    ("quantize: {blocksize: 64}", "quantize.method"),
]


@pytest.mark.parametrize("section,message", RECIPE_ERRORS)
def test_recipe_section_is_validated(section, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(ia3_recipe(*IA3_TARGETS["llama"]) + section + "\n", source="r.yaml")
    assert f"r.yaml:{ia3_recipe(*IA3_TARGETS['llama']).count(chr(10)) + 1}:" in str(e.value) and message in str(e.value)


def test_override_and_skip(tmp_path):
    from graftr.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(quant_recipe("llama", None))
    r = load_recipe(path, ["quantize.method=fp4", "quantize.skip=[model.layers.0.mlp.*]"])
    assert r.quantize.method == "fp4" and r.quantize.skip == ["model.layers.0.mlp.*"]
    gm = graft(tiny_model("llama"), r)
    assert [s.path for s in gm.site_index.linear if not s.quant] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    off = load_recipe(path, ["quantize.method=none"])
    assert not any(s.quant for s in graft(tiny_model("llama"), off).site_index.linear)
    with pytest.raises(GraftrError, match="selects no linear site"):
        graft(tiny_model("llama"), load_recipe(path, ["quantize.method=nf4", "quantize.skip=['**']"]))


def test_missing_bitsandbytes_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(GraftrError, match=r"quantize needs bitsandbytes, which is not installed: pip install"):
        graft(tiny_model("llama"), parse_recipe(quant_recipe("llama", "{method: nf4}")))


# ---- apply, merge, PEFT, eval -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(root):
    """An IA³ + InA (p = 0) adapter made on the nf4-quantized tiny Llama, its tensors moved from their init."""
    text = ia3_recipe(*IA3_TARGETS["llama"]) + (
        '  - {name: lora, match: {path: "model.layers.*.self_attn.q_proj"}, adapter: {kind: ina, inhibition: 0}}\n'
        "quantize: {method: nf4, compute_dtype: float32}\n")
    base = AutoModelForCausalLM.from_pretrained(root / "llama").eval()
    gm = randomize_and_save(graft(base, parse_recipe(text)), root / "adapter")
    return root / "adapter", gm, example_inputs(base, 2, 9)


def test_apply_reports_quantized_sites_and_bytes(root, adapter, capsys):
    capsys.readouterr()
    assert cli.main(["apply", str(adapter[0] / "recipe.yaml"), "--model", str(root / "llama")]) == 0
    out = capsys.readouterr().out
    # 2 layers of q, o (32x32), k, v (16x32), gate, up, down (64x32): 18,432 fp32 weights, 72 KiB; nf4: 4 bits per
    # weight plus one fp32 absmax per 64 weights, 9,216 + 1,152 bytes
    assert "quantized 14 linear sites (nf4): 72.00 KiB of weights stored in 10.12 KiB" in out


def test_estimate_counts_the_packed_base(root, tmp_path):
    """graftr estimate of a quantizing recipe: the base is the unquantized tensors plus bitsandbytes' storage."""
    from graftr.estimate import estimate
    from graftr.recipe import load_recipe

    path = recipe(tmp_path / "q.yaml", [RULES["ina"]], LOWERS, head="quantize: {method: nf4}\n")
    dense = recipe(tmp_path / "d.yaml", [RULES["ina"]], LOWERS)
    q, d = (estimate(load_recipe(p), str(root / "llama"), 1) for p in (path, dense))
    # 14 linears (18,432 weights, 73,728 fp32 bytes) stored in 10,368 bytes; the rest of the base unchanged
    assert q.counts["quantized"] == 18_432 and d.counts["quantized"] == 0
    assert d.base - q.base == 73_728 - 10_368
    assert q.counts["base"] == d.counts["base"]


def test_merge_writes_the_dequantized_weights_in_16_bits(root, adapter, tmp_path, capsys):
    path, gm, inputs = adapter
    capsys.readouterr()
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "bf16")]) == 0
    out = capsys.readouterr().out
    assert "quantized (nf4)" in out and "dequantized weights of 14 linear layers" in out and "bfloat16" in out
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert not any(info.values()) and loaded.dtype == torch.bfloat16
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    ours = logits(gm, inputs)
    torch.testing.assert_close(logits(exact, inputs), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(loaded.float().eval(), inputs), ours, atol=0.1, rtol=0.05)
    with pytest.raises(MergeError, match="stored quantized"):
        gm.merge_()


def test_peft_export_of_an_adapter_trained_on_4_bits(root, adapter, tmp_path):
    from peft import PeftModel

    path, gm, inputs = adapter
    reference = AutoModelForCausalLM.from_pretrained(root / "llama").eval()
    with torch.no_grad():
        for site in (s for s in gm.site_index.linear if s.quant):
            w = reference.get_parameter(site.weight)
            w.copy_(bnb_round_trip(w, "nf4", "out_in"))
    text = (path / "recipe.yaml").read_text()
    for name in ("ia3", "lora"):  # PEFT loads one adapter type at a time: export each rule's part on its own
        keep = {"ia3": ("ia3_attn", "ia3_ff"), "lora": ("lora",)}[name]
        sub = graft(AutoModelForCausalLM.from_pretrained(root / "llama"), parse_recipe(_only_rules(text, keep)))
        assert sum(1 for s in sub.site_index.linear if s.quant) == 14
        with torch.no_grad():
            for n, p in sub.adapter_state_dict().items():
                p.copy_(gm.get_parameter(n))
        export_peft(sub, tmp_path / name)
        peft = PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / name)).eval()
        torch.testing.assert_close(logits(peft, inputs), logits(sub.eval(), inputs), atol=1e-5, rtol=0)


def _only_rules(recipe_text: str, names) -> str:
    import yaml

    data = yaml.safe_load(recipe_text)
    data["rules"] = [r for r in data["rules"] if r["name"] in names]
    return yaml.safe_dump(data)


def test_eval_and_generate_on_the_quantized_base(root, adapter, capsys):
    """Both load the base quantized as the adapter's recipe says: eval's loss is the quantized model's."""
    from test_train import whole_set_loss

    from graftr.data import DataConfig

    path, gm, inputs = adapter
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(path), "--prompt", "Name a colour.", "--max-new-tokens", "4"]) == 0
    assert cli.main(["eval", "--adapter", str(path), "--data", str(root / "alpaca.jsonl"), "--split", "train",
                     "--batch-size", "8", "data.format=alpaca", "data.max_length=96"]) == 0
    out = capsys.readouterr().out
    cfg = DataConfig(format="alpaca", max_length=96, eval_split=None)
    loss = whole_set_loss(gm, root / "llama", str(root / "alpaca.jsonl"), cfg, "causal_lm")
    assert f"{loss:.4f}" in out, out


@pytest.mark.slow  # two processes through the DeepSpeed launcher
def test_two_processes_train_as_one_on_a_quantized_base(root, tmp_path):
    """--nproc 2 (ZeRO-2, micro-batch 4 each) computes what one process computes with micro-batch 8: every rank
    quantizes the same weights the same way."""
    from test_train import graftr_train

    path = recipe(tmp_path / "two.yaml", [RULES["ina"]], LOWERS.replace("max_steps: 6", "max_steps: 3"),
                  head=QUANTIZE_HEAD)
    common = [path, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl")]
    assert cli.main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    log = graftr_train(*common, "--out", str(tmp_path / "two"), "--nproc", "2", "train.micro_batch_size=4",
                       cwd=tmp_path)
    assert "on 2 process(es), ZeRO-2" in log and "quantized 14 linear sites (nf4)" in log
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
