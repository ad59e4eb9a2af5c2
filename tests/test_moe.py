"""Mixture-of-Experts: expert sites, every linear kind on the fused experts, the router, PEFT's target_parameters.

The reference is independent of graftr's graph: the HF model's experts module run by a per-token, per-expert
Python loop (:func:`eager_reference`) with each adapter's equation applied by hand to expert ``e``'s weights.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from zoo import MOE_ARCHS, example_inputs, tiny_model

from graftr import graft
from graftr.errors import GraftrError, MatchError
from graftr.grafted import prepare
from graftr.recipe import parse_recipe

ACT = {"leaky_relu": lambda t: F.leaky_relu(t, 0.01)}


def recipe(adapter: str, match: str = "{op: experts}", header: str = "") -> str:
    return f"name: moe\n{header}rules:\n  - name: x\n    match: {match}\n    adapter: {adapter}\n"


def randomize(gm) -> None:
    """Every adapter parameter away from its identity init, so a dropped term shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _weights(experts, role, layout_in_out):
    """W[e] as (out, in) and b[e] (or None) for role "gate_up_proj"/"down_proj"."""
    w = getattr(experts, role)
    w = w.transpose(1, 2) if layout_in_out else w
    return w, getattr(experts, f"{role}_bias", None)


def eager_reference(model, gm):
    """Patch every experts module of ``model`` with a per-token loop that applies the adapters grafted into ``gm``
    (their parameters read from ``gm``) by hand, and return the patched model's logits function."""
    adapters = {}  # (experts path, role) -> [(module, position)]
    for site in gm.site_index.experts:
        owner, role = site.path.rsplit(".", 1)
        adapters[(owner, role)] = [gm.get_submodule(t) for t in site.adapters]

    def hand(module, e, x, y):
        """One adapter on expert e: y' from the routed token x (input position: returns x')."""
        name = type(module).__name__
        if name == "ExpertInA":
            a = module.subset.full(module.lora_A)[e]
            b = module.subset.full(module.lora_B)[e]
            z = a @ x
            if module.inhibition > 0:
                z = ACT[module.activation](z - module.inhibition * z.max())
            return y + module.scaling * (b @ z)
        if name == "ExpertIA3":
            l = module.subset.full(module.ia3_l, fill=1.0)[e]
            return x * l if module.position == "input" else y * l
        if name == "ExpertScaleBias":
            return (y + module.subset.full(module.bias)[e]) * module.subset.full(module.scale, fill=1.0)[e]
        raise AssertionError(name)

    def make_forward(path):
        def forward(self, hidden, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden)
            in_out = getattr(self, "is_transposed", False)
            for t in range(hidden.shape[0]):
                for k in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, k])

                    def project(role, x):
                        mods = adapters.get((path, role), [])
                        for m in mods:
                            if m.position == "input":
                                x = hand(m, e, x, None)
                        w, b = _weights(self, role, in_out)
                        y = w[e] @ x + (b[e] if b is not None else 0)
                        for m in mods:
                            if m.position == "output":
                                y = hand(m, e, x, y)
                        return y

                    h = self._apply_gate(project("gate_up_proj", hidden[t])[None])[0]
                    out[t] += top_k_weights[t, k] * project("down_proj", h)
            return out
        return forward

    for path, module in model.named_modules():
        if hasattr(module, "_is_expert_parallel"):
            module.forward = types.MethodType(make_forward(path), module)
    return model


KINDS = {
    "ina": "{kind: ina, inhibition: 0.3, rank: 4}",
    "lora": "{kind: ina, inhibition: 0, rank: 4}",
    "ia3_out": "{kind: ia3}",
    "ia3_in": "{kind: ia3, scale: input}",
    "scale_bias": "{kind: scale_bias}",
}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_sites_are_found_with_their_layout(arch):
    gm = prepare(tiny_model(arch))
    sites = gm.site_index.experts
    assert [s.path for s in sites] == [f"model.layers.{i}.mlp.experts.{r}" for i in range(2)
                                       for r in ("gate_up_proj", "down_proj")]
    gate_up, down = sites[:2]
    assert (gate_up.num_experts, gate_up.in_features, gate_up.out_features) == (8, 32, 32)
    assert (down.in_features, down.out_features) == (16, 32)
    assert gate_up.layout == ("in_out" if arch == "gpt_oss" else "out_in")
    assert gate_up.fused == ("interleaved" if arch == "gpt_oss" else "concatenated")
    assert (gate_up.bias is not None) == (arch == "gpt_oss")
    routers = [s.path for s in gm.site_index.linear if s.role == "router"]
    assert routers == [f"model.layers.{i}.mlp.{'router' if arch == 'gpt_oss' else 'gate'}" for i in range(2)]
    assert gm.grafting.experts_implementation == "grouped_mm"


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_on_experts_is_the_identity_at_init_and_equals_the_eager_reference(arch, kind):
    model = tiny_model(arch)
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        base = model(**inputs).logits
    gm = graft(model, parse_recipe(recipe(KINDS[kind]))).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=0)
    randomize(gm)
    with torch.no_grad():
        got = gm(**inputs).logits
        assert (got - base).abs().max() > 1e-3  # the adapters act
        want = eager_reference(tiny_model(arch), gm)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kinds_compose_on_one_expert_site_and_a_subset_of_experts():
    model = tiny_model("qwen3_moe")
    inputs = example_inputs(model, 2, 6)
    text = ("name: moe\nrules:\n"
            "  - {name: ff, match: {path: 'model.layers.*.mlp.experts.down_proj'}, adapter: {kind: ia3, scale: input}}\n"
            "  - {name: lo, match: {op: experts, experts: {range: [2, 5]}}, adapter: {kind: ina, rank: 4}}\n"
            "  - {name: sb, match: {path: '**.experts.gate_up_proj', layers: {last: 1}}, adapter: {kind: scale_bias}}\n")
    gm = graft(model, parse_recipe(text)).eval()
    lo = gm.get_submodule("model.layers.0.mlp.experts.gate_up_proj_lo")
    assert lo.lora_A.shape == (3, 4, 32) and lo.subset.selected == [2, 3, 4]
    assert [p.rule.name for p in gm.plans] == ["ff", "lo", "sb"] and [len(p.sites) for p in gm.plans] == [2, 4, 1]
    randomize(gm)
    with torch.no_grad():
        want = eager_reference(tiny_model("qwen3_moe"), gm)(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_expert_selection_errors_are_one_line():
    model = tiny_model("qwen3_moe")
    with pytest.raises(MatchError, match="cannot select experts of model.layers.0.mlp.experts.gate_up_proj: "
                                         "range \\[0, 9\\) but the stack has only 8 experts"):
        graft(model, parse_recipe(recipe("{kind: ia3}", "{op: experts, experts: {range: [0, 9]}}")))
    with pytest.raises(MatchError, match="gated_prompt.*attaches to attention"):
        graft(model, parse_recipe(recipe("{kind: gated_prompt}", "{op: experts}")))


def test_training_lowers_the_loss_and_only_the_adapters_move():
    model = tiny_model("mixtral")
    gm = graft(model, parse_recipe(recipe(KINDS["lora"]))).train()
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    inputs = example_inputs(model, 4, 12)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = gm(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    moved = {n for n, p in gm.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("_x." in n for n in moved)  # <site>_<rule>.lora_*: the adapters, no base weight


def test_router_is_a_linear_site_an_adapter_can_target():
    model = tiny_model("qwen3_moe")
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        base = model(**inputs).logits
    gm = graft(model, parse_recipe(recipe("{kind: ina, inhibition: 0}", "{path: 'model.layers.*.mlp.gate'}"))).eval()
    assert [len(p.sites) for p in gm.plans] == [2]
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=0)
    randomize(gm)
    with torch.no_grad():
        assert (gm(**inputs).logits - base).abs().max() > 1e-4  # the routing changed
    # the router trains in place instead, by recipe
    gm = graft(tiny_model("qwen3_moe"), parse_recipe(
        recipe("{kind: ia3}", header="trainable_modules: ['model.layers.*.mlp.gate']\n")))
    trainable = sorted(n for n, p in gm.named_parameters() if p.requires_grad and "gate.weight" in n)
    assert trainable == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]


def test_shared_experts_are_linear_sites():
    gm = graft(tiny_model("qwen2_moe"), parse_recipe(recipe("{kind: ia3, scale: input}",
                                                            "{path: '**.mlp.shared_expert.down_proj'}")))
    assert [s.path for s in gm.plans[0].sites] == [f"model.layers.{i}.mlp.shared_expert.down_proj" for i in range(2)]


def test_merge_folds_expert_adapters_into_the_fused_weights():
    for arch, kind in (("qwen3_moe", "lora"), ("gpt_oss", "ia3_in"), ("gpt_oss", "scale_bias"), ("mixtral", "ia3_out")):
        model = tiny_model(arch)
        inputs = example_inputs(model, 2, 6)
        gm = graft(model, parse_recipe(recipe(KINDS[kind]))).eval()
        randomize(gm)
        with torch.no_grad():
            want = gm(**inputs).logits
            gm.merge_()
            assert not gm.site_index.experts[0].adapters
            torch.testing.assert_close(gm(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_learned_bias_where_the_experts_have_none():
    gm = graft(tiny_model("qwen3_moe"), parse_recipe(recipe(KINDS["scale_bias"]))).eval()
    randomize(gm)
    with pytest.raises(GraftrError, match="these experts have no bias parameter"):
        gm.merge_()


def test_an_experts_module_that_does_not_dispatch_is_refused_by_name():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    cls = type(experts)
    plain = type("HandWrittenExperts", (torch.nn.Module,), {"forward": cls.forward})
    module = plain()
    module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
    model.model.layers[0].mlp.experts = module
    for layer in model.model.layers[1:]:
        layer.mlp.experts = plain()
        layer.mlp.experts.gate_up_proj = experts.gate_up_proj
    with pytest.raises(GraftrError, match="model.layers.0.mlp.experts \\(HandWrittenExperts\\) holds fused expert "
                                          "weights but does not dispatch"):
        prepare(model)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_peft_target_parameters_round_trip_with_peft_logits(arch, tmp_path):
    """A PEFT LoRA on the experts (target_parameters) and on q_proj, saved by PEFT, imports with PEFT's logits, and
    graftr's export loads into PEFT with the same logits and tensors."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from graftr.formats.peft import export_peft, import_peft

    model = tiny_model(arch)
    inputs = example_inputs(model, 2, 6)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        want = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "peft")
    gm = import_peft(tiny_model(arch), tmp_path / "peft").eval()
    assert [(p.rule.name, p.rule.match.op, len(p.sites)) for p in gm.plans] == [("ina", None, 2),
                                                                               ("ina_experts", "experts", 4)]
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    out = export_peft(gm, tmp_path / "again")
    saved, again = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(again) == sorted(saved)
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0)
    back = peft.PeftModel.from_pretrained(tiny_model(arch), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_export_refuses_dropout_on_experts(tmp_path):
    from graftr.formats.peft import export_peft

    gm = graft(tiny_model("qwen3_moe"), parse_recipe(recipe("{kind: ina, inhibition: 0, dropout: 0.1}")))
    with pytest.raises(GraftrError, match="target_parameters\\) has no dropout"):
        export_peft(gm, tmp_path / "peft")


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_graftr_merge_writes_a_checkpoint_plain_transformers_loads(arch, tmp_path):
    from after_training_kit import model_dir, randomize_and_save
    from transformers import AutoModelForCausalLM

    from graftr import cli

    base = model_dir(tmp_path / "base", arch)
    text = ("name: moe\nrules:\n  - {name: ff, match: {path: '**.experts.down_proj'}, adapter: {kind: ia3, "
            "scale: input}}\n  - {name: lo, match: {op: experts}, adapter: {kind: ina, inhibition: 0, rank: 4}}\n")
    gm = randomize_and_save(graft(base, parse_recipe(text)), tmp_path / "adapter")
    inputs = example_inputs(base, 2, 6)
    with torch.no_grad():
        want = gm(**inputs).logits
    assert cli.main(["merge", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-5, atol=1e-5)


# ---- training at scale: graftr train on an MoE checkpoint, ZeRO-3 over two processes equals one -----------------

ZERO = """
max_steps: 3
micro_batch_size: 4
lr: 0.02
log_every: 1
data: {format: text, packing: true, max_length: 16}
"""


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """A Qwen3-MoE checkpoint saved as transformers saves it (one tensor per expert, converted on load), LoRA on the
    experts and IA³ on the experts' intermediate activation: one process, then two under ZeRO-3 (layers outlined,
    each gathered with its expert tensors), then one with activation checkpointing."""
    from after_training_kit import model_dir
    from test_train import WORDS, graftr_train, recipe as train_recipe, write_jsonl

    out = tmp_path_factory.mktemp("moe")
    model_dir(out / "qwen3_moe", "qwen3_moe")
    docs = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(4 + i % 7)) for i in range(48)]
    write_jsonl(out / "text" / "train.jsonl", [{"text": d} for d in docs[:40]])
    write_jsonl(out / "text" / "validation.jsonl", [{"text": d} for d in docs[40:]])
    rules = ["{name: ff, match: {path: '**.experts.down_proj'}, adapter: {kind: ia3, scale: input}}",
             "{name: lo, match: {op: experts}, adapter: {kind: ina, inhibition: 0.3, rank: 4, alpha: 8}}"]
    path = train_recipe(out / "moe.yaml", rules, ZERO)
    common = [path, "--model", str(out / "qwen3_moe"), "--data", str(out / "text")]
    logs = {"one": graftr_train(*common, "--out", str(out / "one"), cwd=out),
            "zero3": graftr_train(*common, "--out", str(out / "zero3"), "--nproc", "2", "train.micro_batch_size=2",
                                  "train.zero_stage=3", cwd=out),
            "ckpt": graftr_train(*common, "--out", str(out / "ckpt"), "train.activation_checkpointing=layers", cwd=out)}
    return out, logs


@pytest.mark.slow  # two processes through the DeepSpeed launcher
def test_zero3_on_experts_equals_one_process_and_checkpointing_changes_nothing(moe_runs):
    from test_train import adapter_tensors, records

    out, logs = moe_runs
    assert "on 2 process(es), ZeRO-3" in logs["zero3"] and "outlined 2 layers" in logs["zero3"]
    one = records(out / "one")
    assert [r["step"] for r in one] == [1, 2, 3]
    for run in ("zero3", "ckpt"):
        other = records(out / run)
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in other] == pytest.approx([r[key] for r in one], rel=1e-5), (run, key)
        a, b = adapter_tensors(out / "one"), adapter_tensors(out / run)
        assert sorted(a) == sorted(b) and len(a) == 2 * (1 + 2 * 2)  # per layer: ia3 on down, A/B on both sites
        for name in a:
            # Adam divides by √v: reduction order across two ranks moves a few elements by ~1e-6 on values ~0.2-1
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=5e-6), (run, name)


def test_a_quantized_base_refuses_packed_experts_and_keeps_them_dense_when_skipped():
    pytest.importorskip("bitsandbytes")
    header = "quantize: {method: nf4}\n"
    with pytest.raises(GraftrError, match="model.layers.0.mlp.experts.gate_up_proj and 3 more fused expert weights "
                                          "\\(3-D\\) cannot be stored packed"):
        graft(tiny_model("qwen3_moe"), parse_recipe(recipe(KINDS["lora"], header=header)))
    header = "quantize: {method: nf4, skip: ['**.mlp.experts.*']}\n"
    model = tiny_model("qwen3_moe")
    inputs = example_inputs(model, 2, 6)
    gm = graft(model, parse_recipe(recipe(KINDS["lora"], header=header))).eval()
    quantized = sorted(gm.grafting.quantized)
    assert quantized and all("self_attn" in p for p in quantized)  # the routers and experts stay dense
    randomize(gm)
    with torch.no_grad():
        assert torch.isfinite(gm(**inputs).logits).all()


def test_a_bf16_base_trains_experts_in_fp32_adapters():
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    gm = graft(model, parse_recipe(recipe(KINDS["ina"]))).train()
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}
    inputs = example_inputs(model, 2, 8)
    loss = gm(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


def test_named_expert_adapters_switch_and_disable_to_the_base(tmp_path):
    from graftr import save_adapter

    model = tiny_model("olmoe")
    inputs = example_inputs(model, 2, 6)
    with torch.no_grad():
        base = model(**inputs).logits
    gm = graft(model, parse_recipe(recipe(KINDS["ina"]))).eval()
    randomize(gm)
    save_adapter(gm, tmp_path / "a")
    gm.add_adapter("b", parse_recipe(recipe(KINDS["ia3_in"])))
    randomize(gm)  # only the active adapter's tensors are trainable: "a"'s move again, "b"'s stay at init
    with torch.no_grad():
        a = gm(**inputs).logits
        gm.set_adapter("b")
        torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=0)  # "b" is still the identity
        with gm.disable_adapter():
            torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=0)
        gm.set_adapter("default")
        torch.testing.assert_close(gm(**inputs).logits, a, rtol=0, atol=0)


def test_role_selects_expert_weights_and_routers_whatever_their_module_names():
    for arch, router in (("gpt_oss", "router"), ("mixtral", "gate")):
        gm = graft(tiny_model(arch), parse_recipe(recipe("{kind: ina, inhibition: 0}", "{role: [down_proj, router]}")))
        assert [s.path for s in gm.plans[0].sites] == [f"model.layers.{i}.mlp.{router}" for i in range(2)] + [
            f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
