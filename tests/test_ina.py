"""InA: identity at init, the exact formula (module and whole model), p = 0 is LoRA (and PEFT's LoRA), the gradient
through the threshold, dropout, merge, dtypes, the shipped recipes, and the PEFT format (the published adapter)."""

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from zoo import example_inputs, tiny_model

from graftr import graft
from graftr.adapters.ina import InA, InAConfig
from graftr.errors import AdapterLoadError, GraftrError, MergeError, RecipeError
from graftr.models import build_model, resolve
from graftr.formats.peft import export_peft, import_peft
from graftr.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "ina_bert_large_cola"
if not FIXTURE.is_dir():
    FIXTURE = Path("/work/shared/fixtures/ina_bert_large_cola")
PREFIX = "base_model.model."

# f written out independently of graftr.adapters.ina
REFERENCE_F = {
    "leaky_relu": lambda t: torch.where(t > 0, t, 0.01 * t),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
}


def _recipe(path: str, **adapter) -> str:
    options = ", ".join(f"{k}: {v}" for k, v in adapter.items())
    return f"""
name: t
rules:
  - name: ina
    match: {{path: "{path}"}}
    adapter: {{kind: ina{', ' + options if options else ''}}}
"""


LLAMA_QK = "model.layers.*.self_attn.{q_proj,k_proj}"
GPT2_QKV = "transformer.h.*.attn.c_attn"  # Conv1D, fused qkv
NEOX_QKV = "gpt_neox.layers.*.attention.query_key_value"  # a fused qkv linear


def _randomize(gm, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gm.adapter_modules().values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * scale)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * scale)


def _reference(module: InA, x, y):
    """y + s·B f(z − p·max z), z = A x, in fp32 (p = 0: no activation)."""
    z = x.float() @ module.lora_A.detach().float().T
    if module.inhibition > 0:
        z = REFERENCE_F[module.activation](z - module.inhibition * z.max(dim=-1, keepdim=True).values)
    return (y.float() + module.scaling * z @ module.lora_B.detach().float().T).to(y.dtype)


def _hook_reference(model, gm):
    """Forward hooks on the HF model's own linear modules adding the InA branch with the grafted A, B."""
    handles = []
    for target, module in gm.adapter_modules().items():
        site = model.get_submodule(target.rsplit(".", 1)[0])
        handles.append(site.register_forward_hook(lambda m, i, o, a=module: _reference(a, i[0], o)))
    return handles


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---- the module ----------------------------------------------------------------------------------------------------
def test_init_is_lora_init_and_identity():
    torch.manual_seed(0)
    m = InA(40, 24, InAConfig(rank=4))
    torch.manual_seed(0)
    expected = torch.nn.init.kaiming_uniform_(torch.empty(4, 40), a=math.sqrt(5))
    assert torch.equal(m.lora_A, expected) and m.lora_A.abs().max() <= 1 / math.sqrt(40)
    assert torch.equal(m.lora_B, torch.zeros(24, 4))
    assert m.lora_A.shape == (4, 40) and m.scaling == 4.0 and isinstance(m.lora_A, torch.nn.Parameter)
    torch.manual_seed(0)
    g = InA(40, 24, InAConfig(rank=4, init="gaussian"))
    torch.manual_seed(0)
    assert torch.equal(g.lora_A, torch.empty(4, 40).normal_(std=1 / 4)) and not g.lora_B.any()
    x, y = torch.randn(2, 5, 40), torch.randn(2, 5, 24)
    assert torch.equal(m(x, y), y)


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_module_equals_formula(p, activation):
    m = InA(12, 10, InAConfig(rank=6, alpha=9, inhibition=p, activation=activation))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(10, 6, generator=gen))
    x, y = torch.randn(3, 7, 12, generator=gen), torch.randn(3, 7, 10, generator=gen)
    got = m(x, y)
    # token by token, in float64
    A, B = m.lora_A.detach().double(), m.lora_B.detach().double()
    f = REFERENCE_F[activation]
    for b in range(3):
        for t in range(7):
            z = A @ x[b, t].double()
            u = f(z - p * z.max())
            torch.testing.assert_close(got[b, t].double(), y[b, t].double() + 1.5 * B @ u, atol=1e-5, rtol=0)


def test_zero_inhibition_is_plain_lora_without_activation():
    m = InA(8, 5, InAConfig(rank=3, alpha=6, inhibition=0.0))
    with torch.no_grad():
        m.lora_B.normal_()
    x, y = torch.randn(4, 8), torch.randn(4, 5)
    torch.testing.assert_close(m(x, y), y + 2.0 * (x @ m.lora_A.T) @ m.lora_B.T, atol=1e-6, rtol=0)
    assert (x @ m.lora_A.T < 0).any()  # a leaky_relu would have changed these entries


def test_gradient_reaches_the_argmax_through_the_threshold():
    """With in = 1 and x = 1, z = A[:, 0], so A.grad[:, 0] is dL/dz; compare with the analytic gradient."""
    p, s = 0.3, 2.0
    m = InA(1, 4, InAConfig(rank=5, alpha=10, inhibition=p))
    with torch.no_grad():
        m.lora_A.copy_(torch.tensor([[0.5], [-0.2], [1.3], [0.1], [-0.9]]))
        m.lora_B.copy_(torch.randn(4, 5))
    w = torch.randn(4)
    (m(torch.ones(1), torch.zeros(4)) * w).sum().backward()
    z = m.lora_A.detach()[:, 0]
    g = s * m.lora_B.detach().T @ w  # dL/du
    slope = torch.where(z - p * z.max() > 0, 1.0, 0.01)  # f'(z - Th)
    direct = g * slope
    k = int(z.argmax())
    expected = direct.clone()
    expected[k] -= p * (g * slope).sum()  # the threshold's share, all on the arg-max
    torch.testing.assert_close(m.lora_A.grad[:, 0], expected, atol=1e-6, rtol=0)
    assert abs(expected[k] - direct[k]) > 1e-3  # the term is there, so a detached max would fail this test


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu"])
def test_gradcheck_float64(activation):
    m = InA(6, 5, InAConfig(rank=4, inhibition=0.3, activation=activation)).double()
    A = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    fn = lambda a, b: torch.func.functional_call(m, {"lora_A": a, "lora_B": b}, (x, y))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (A, B))


def test_dropout_one_sample_for_z_and_threshold_and_mode_switch():
    m = InA(16, 8, InAConfig(rank=4, inhibition=0.3, dropout=0.5))
    assert isinstance(m.dropout, torch.nn.Dropout)
    with torch.no_grad():
        m.lora_B.normal_()
    x, y = torch.randn(3, 16), torch.randn(3, 8)
    m.train()
    torch.manual_seed(7)
    got = m(x, y)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, _reference(m, dropped, y), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _reference(m, x, y))
    m.eval()
    torch.testing.assert_close(m(x, y), _reference(m, x, y), atol=1e-6, rtol=0)


def test_config_validation():
    with pytest.raises(RecipeError, match="scale"):
        parse_recipe(_recipe(LLAMA_QK, scale=2))
    with pytest.raises(RecipeError, match="inhibition"):
        parse_recipe(_recipe(LLAMA_QK, inhibition=1.5))
    with pytest.warns(UserWarning, match="no effect with inhibition 0"):
        InAConfig(inhibition=0, activation="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InAConfig(inhibition=0)


# ---- whole models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,path,sites", [("llama", LLAMA_QK, 4), ("gpt2", GPT2_QKV, 2)])
def test_whole_model_identity_at_init_then_equals_hooked_eager_model(arch, path, sites):
    """Exact identity at init; then, with random A and B, equal to the HF model with the formula in forward hooks
    on its own linear modules, for several p and both activations (set on the grafted modules, one trace)."""
    model = tiny_model(arch)
    gm = graft(model, parse_recipe(_recipe(path, rank=4))).eval()
    assert [len(p.sites) for p in gm.plans] == [sites]
    inputs = example_inputs(model, 2, 9)
    base = _logits(model, inputs)
    assert torch.equal(_logits(gm, inputs), base)
    _randomize(gm)
    for p, activation in [(0.1, "leaky_relu"), (0.3, "leaky_relu"), (0.9, "leaky_relu"), (0.1, "gelu"),
                          (0.3, "gelu"), (0.9, "gelu"), (0.0, "leaky_relu")]:
        for module in gm.adapter_modules().values():
            module.inhibition, module.activation = p, activation
        handles = _hook_reference(model, gm)
        expected = _logits(model, inputs)
        for h in handles:
            h.remove()
        got = _logits(gm, inputs)
        assert not torch.allclose(got, base, atol=1e-3)  # the adapters do something
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"p={p}, {activation}: {m}")


@pytest.mark.parametrize("arch,path,targets", [("llama", LLAMA_QK, ["q_proj", "k_proj"]),
                                               ("gpt2", GPT2_QKV, ["c_attn"])])
def test_zero_inhibition_equals_peft_lora(tmp_path, arch, path, targets):
    """Same A, B copied into a PEFT LoRA model, and the exported adapter loaded by stock PEFT: equal logits
    (GPT-2: Conv1D, whose weight is (in, out), with PEFT's fan_in_fan_out)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_model(arch)
    gm = graft(model, parse_recipe(_recipe(path, inhibition=0.0, rank=4, alpha=8))).eval()
    _randomize(gm)
    peft_model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for target, module in gm.adapter_modules().items():
            layer = peft_model.base_model.model.get_submodule(target.rsplit(".", 1)[0])
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
    inputs = example_inputs(model, 2, 8)
    got = _logits(gm, inputs)
    assert not torch.allclose(got, _logits(model, inputs), atol=1e-3)
    torch.testing.assert_close(got, _logits(peft_model.eval(), inputs), atol=1e-6, rtol=0)

    out = export_peft(gm, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == targets and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["lora_inhibition"] == 0.0 and config["modules_to_save"] is None
    loaded = PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, inputs), got, atol=1e-6, rtol=0)


def test_dropout_follows_train_and_eval():
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(_recipe(LLAMA_QK, dropout=0.5)))
    _randomize(gm)
    inputs = example_inputs(model, 2, 6)
    gm.train()
    assert all(m.dropout.training for m in gm.adapter_modules().values())
    assert not torch.equal(_logits(gm, inputs), _logits(gm, inputs))
    gm.eval()
    assert torch.equal(_logits(gm, inputs), _logits(gm, inputs))


def test_merge_refused_with_inhibition():
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(_recipe(LLAMA_QK, inhibition=0.3)))
    with pytest.raises(MergeError, match="per-token threshold .* cannot be folded into a weight"):
        gm.merge_()
    assert len(gm.adapter_modules()) == 4  # nothing changed


@pytest.mark.parametrize("arch,path", [("llama", LLAMA_QK), ("gpt2", GPT2_QKV)])
def test_merge_exact_without_inhibition(arch, path):
    model = tiny_model(arch)
    gm = graft(model, parse_recipe(_recipe(path, inhibition=0.0))).eval()
    _randomize(gm)
    inputs = example_inputs(model, 2, 6)
    before = _logits(gm, inputs)
    assert not torch.allclose(before, _logits(model, inputs), atol=1e-3)
    gm.merge_()
    assert not gm.adapter_modules()
    torch.testing.assert_close(_logits(gm, inputs), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,path", [("llama", LLAMA_QK), ("gpt2", GPT2_QKV), ("gpt_neox", NEOX_QKV)])
@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.bfloat16, "float32"), (torch.float16, "bfloat16"),
                                                      (torch.float16, "float16")])
def test_low_precision_base(arch, path, base_dtype, adapter_dtype):
    """Separate linears, Conv1D with fused qkv (GPT-2) and a fused qkv linear (GPT-NeoX), on bf16/fp16 bases: the
    adapter keeps its dtype, the output the base's, identity at init, then the formula (hooked, in fp32)."""
    model = tiny_model(arch).to(base_dtype)
    gm = graft(model, parse_recipe(_recipe(path, dtype=adapter_dtype))).eval()
    modules = list(gm.adapter_modules().values())
    assert all(m.lora_A.dtype == getattr(torch, adapter_dtype) for m in modules)
    inputs = example_inputs(model, 2, 5)
    out = _logits(gm, inputs)
    assert out.dtype == base_dtype and torch.equal(out, _logits(model, inputs))  # identity at init
    _randomize(gm)
    handles = _hook_reference(model, gm)
    expected = _logits(model, inputs)
    for h in handles:
        h.remove()
    got = _logits(gm, inputs)
    assert got.dtype == base_dtype and not torch.equal(got, out)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)


# ---- shipped recipes -----------------------------------------------------------------------------------------------
def test_shipped_recipes_exact_match_counts():
    llama = load_recipe(ROOT / "recipes" / "ina_llama.yaml")
    gm = graft(tiny_model("llama"), llama)
    assert {p.name: len(p.sites) for p in gm.plans} == {"ina_qk": 4}
    assert {m.inhibition for m in gm.adapter_modules().values()} == {0.3}
    roberta = load_recipe(ROOT / "recipes" / "ina_roberta.yaml")
    model = tiny_model("roberta", task=roberta.task, num_labels=roberta.num_labels)
    gm = graft(model, roberta)
    assert {p.name: len(p.sites) for p in gm.plans} == {"ina_qkv": 6}
    assert {n.split(".")[0] for n in gm.adapter_state_dict() if ".ina_qkv." not in n} == {"classifier"}


def test_llama2_7b_structure_64_sites_and_exact_trainable_count():
    source = resolve("meta-llama/Llama-2-7b-hf")
    model = build_model(source.config, "causal_lm", device="meta")
    gm = graft(model, load_recipe(ROOT / "recipes" / "ina_llama.yaml"))
    assert [len(p.sites) for p in gm.plans] == [64]
    per_site = 8 * (4096 + 4096)  # r · (in + out) for q_proj and k_proj
    assert gm.trainable_counts()[0] == 64 * per_site == 4_194_304


# ---- the published adapter (PEFT format) ---------------------------------------------------------------------------
def _bert_large_meta():
    """bert-large-cased, the fixture's base_model_name_or_path, built from its config (the snapshot graftr ships
    when the hub is unreachable) on the meta device, with CoLA's two labels."""
    source = resolve(json.loads((FIXTURE / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert source.config.model_type == "bert" and source.config.hidden_size == 1024
    return build_model(source.config, "seq_cls", device="meta", num_labels=2)


@pytest.fixture(scope="module")
def published():
    return import_peft(_bert_large_meta(), FIXTURE)


def _peft_name(param_name: str) -> str:
    """``bert...query.ina.lora_A`` → ``base_model.model.bert...query.lora_A.weight``."""
    if ".ina." in param_name:
        return PREFIX + param_name.replace(".ina.", ".") + ".weight"
    return PREFIX + param_name


def test_published_adapter_imports_completely(published):
    gm = published
    fixture = load_file(str(FIXTURE / "adapter_model.safetensors"))
    state = gm.adapter_state_dict()
    assert len(fixture) == 146 and len(state) == 146
    assert {_peft_name(n) for n in state} == set(fixture)
    assert all(torch.equal(t, fixture[_peft_name(n)]) and not t.is_meta for n, t in state.items())
    assert [len(p.sites) for p in gm.plans] == [72]
    modules = gm.adapter_modules().values()
    assert {(m.inhibition, m.rank, m.scaling, m.dropout.p, m.activation) for m in modules} == {
        (0.3, 4, 4.0, 0.1, "leaky_relu")}
    assert {s.path.rsplit(".", 1)[1] for s in gm.plans[0].sites} == {"query", "key", "value"}
    assert gm.get_parameter("classifier.weight").device.type == "cpu"  # replaced the meta head
    assert gm.task == "seq_cls" and gm.model_id == "bert-large-cased"


def test_published_adapter_round_trips_bit_for_bit(published, tmp_path):
    """Export writes the fixture's safetensors file byte for byte and its config field for field (PEFT adds the head
    to modules_to_save for SEQ_CLS; graftr writes it explicitly); importing that export and exporting it again
    changes no byte."""
    out = export_peft(published, tmp_path / "peft")
    fixture = load_file(str(FIXTURE / "adapter_model.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert set(exported) == set(fixture)  # the classifier keys too: PEFT saves them unwrapped, as the fixture does
    assert all(exported[k].dtype == fixture[k].dtype and torch.equal(exported[k], fixture[k]) for k in fixture)
    assert _sha256(out / "adapter_model.safetensors") == _sha256(FIXTURE / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((FIXTURE / "adapter_config.json").read_text())
    bookkeeping = {"peft_version", "inference_mode", "auto_mapping", "revision"}
    differing = {k for k in (set(config) | set(original)) - bookkeeping if config.get(k) != original.get(k)}
    assert differing == {"modules_to_save"}, {k: (original.get(k), config.get(k)) for k in differing}
    assert config["lora_inhibition"] == 0.3 and config["modules_to_save"] == ["classifier"]
    again = export_peft(import_peft(_bert_large_meta(), out), tmp_path / "again")
    assert _sha256(again / "adapter_model.safetensors") == _sha256(out / "adapter_model.safetensors")
    assert (again / "adapter_config.json").read_bytes() == (out / "adapter_config.json").read_bytes()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a second trace of bert-large (~10 s); the tiny-model tests below cover each problem fast
def test_corrupted_published_adapter_names_every_problem(tmp_path):
    tensors = load_file(str(FIXTURE / "adapter_model.safetensors"))
    missing = f"{PREFIX}bert.encoder.layer.7.attention.self.key.lora_B.weight"
    reshaped = f"{PREFIX}bert.encoder.layer.3.attention.self.value.lora_A.weight"
    extra = f"{PREFIX}bert.encoder.layer.0.attention.output.dense.lora_A.weight"
    del tensors[missing]
    tensors[reshaped] = torch.zeros(8, 1024)
    tensors[extra] = torch.zeros(4, 1024)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(FIXTURE / "adapter_config.json", bad)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError) as info:
        import_peft(_bert_large_meta(), bad)
    message = str(info.value)
    assert f"1 missing: {missing}" in message and f"1 unexpected: {extra}" in message
    assert f"1 wrong shape: {reshaped} (8, 1024) vs (4, 1024)" in message


# ---- PEFT import/export on tiny models -----------------------------------------------------------------------------
def _peft_adapter(tmp_path, *, inhibition=None, num_labels=2, **lora) -> Path:
    """A LoRA adapter saved by stock PEFT from a tiny BERT classifier (random B), plus `lora_inhibition`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("bert", task="seq_cls", num_labels=num_labels),
                                LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                              "task_type": "SEQ_CLS", **lora}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.3)
    out = tmp_path / "peft"
    peft_model.save_pretrained(str(out))
    if inhibition is not None:
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "lora_inhibition": inhibition}))
    return out


def test_import_honours_inhibition_and_round_trips(tmp_path):
    path = _peft_adapter(tmp_path, inhibition=0.3)
    model = tiny_model("bert", task="seq_cls", num_labels=2)
    gm = import_peft(model, path).eval()
    assert sorted(gm.recipe.rules[0].match.path) == ["**.query", "**.value"]  # PEFT saves target_modules unordered
    assert gm.recipe.trainable_modules == ["classifier"]
    modules = gm.adapter_modules().values()
    assert len(modules) == 4 and {m.inhibition for m in modules} == {0.3}
    saved = load_file(str(path / "adapter_model.safetensors"))
    assert torch.equal(gm.get_parameter("classifier.weight"), saved[f"{PREFIX}classifier.weight"])
    inputs = example_inputs(model, 2, 7)
    handles = _hook_reference(model, gm)
    expected = _logits(model, inputs)
    for h in handles:
        h.remove()
    torch.testing.assert_close(_logits(gm, inputs), expected, atol=1e-5, rtol=0)
    out = export_peft(gm, tmp_path / "again")
    again = load_file(str(out / "adapter_model.safetensors"))
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_cli_converts_both_ways_on_the_structure_and_merge_refuses_before_any_weight(tmp_path, capsys):
    """`graftr export` of a PEFT InA adapter (p = 0.3, a three-label head) onto a base given by its config alone:
    a graftr adapter with the inhibition kept and the head's three rows; exported back, the same tensors. `graftr
    merge` refuses p > 0 from the config, before it would need weights (the base here has none)."""
    from after_training_kit import cli_error

    from graftr import cli
    from graftr.formats.graftr import RECIPE

    path = _peft_adapter(tmp_path, inhibition=0.3, num_labels=3)
    tiny_model("bert").config.save_pretrained(tmp_path / "base")  # the config's default: two labels
    base = ["--model", str(tmp_path / "base" / "config.json")]
    assert cli.main(["export", str(path), *base, "--out", str(tmp_path / "graftr")]) == 0
    recipe = load_recipe(tmp_path / "graftr" / RECIPE)
    assert recipe.rules[0].adapter.inhibition == 0.3 and recipe.trainable_modules == ["classifier"]
    assert load_file(str(tmp_path / "graftr" / "adapter.safetensors"))["classifier.weight"].shape[0] == 3
    assert cli.main(["export", str(tmp_path / "graftr"), *base, "--out", str(tmp_path / "back")]) == 0
    original = load_file(str(path / "adapter_model.safetensors"))
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    for adapter in (path, tmp_path / "graftr"):
        assert "ina with inhibition 0.3 cannot be merged" in cli_error(
            capsys, ["merge", str(adapter), *base, "--out", str(tmp_path / "merged")])
    assert "is already a graftr adapter" in cli_error(
        capsys, ["export", str(tmp_path / "graftr"), "--format", "graftr", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "merged").exists() and not (tmp_path / "x").exists()


def test_import_translates_regex_and_layer_selection(tmp_path):
    path = _peft_adapter(tmp_path, target_modules=r".*layer\.1\.attention\.self\.(query|key)")
    gm = import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)
    assert gm.recipe.rules[0].match.path == ["bert.encoder.layer.1.attention.self.query",
                                             "bert.encoder.layer.1.attention.self.key"]
    assert {m.inhibition for m in gm.adapter_modules().values()} == {0.0}  # no lora_inhibition: plain LoRA
    config = json.loads((export_peft(gm, tmp_path / "out") / "adapter_config.json").read_text())
    assert config["target_modules"] == gm.recipe.rules[0].match.path  # "query" would also adapt layer 0
    path = _peft_adapter(tmp_path / "b", target_modules=["key"], layers_to_transform=[0], layers_pattern="layer")
    gm = import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)
    assert gm.recipe.rules[0].match.layers.indices == [0]
    assert [s.path for s in gm.plans[0].sites] == ["bert.encoder.layer.0.attention.self.key"]
    path = _peft_adapter(tmp_path / "c", target_modules=["key"], exclude_modules=["layer.1.attention.self.key"])
    gm = import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)
    assert gm.recipe.rules[0].match.exclude == ["**.layer.1.attention.self.key"]
    assert [s.path for s in gm.plans[0].sites] == ["bert.encoder.layer.0.attention.self.key"]


@pytest.mark.parametrize("option,value,message", [
    ("use_dora", True, "DoRA"), ("use_rslora", True, "rsLoRA"), ("rank_pattern", {"query": 8}, "per-module ranks"),
    ("alpha_pattern", {"query": 32}, "per-module alphas"), ("some_new_option", 3, "does not know this option"),
])
def test_import_refuses_options_it_cannot_honour(tmp_path, option, value, message):
    path = _peft_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    with pytest.raises(GraftrError, match=f"{option}=.*{message}"):
        import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: t.pop(f"{PREFIX}bert.encoder.layer.1.attention.self.value.lora_A.weight"),
     "1 missing: base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"),
    (lambda t: t.update({f"{PREFIX}bert.pooler.dense.lora_A.weight": torch.zeros(4, 32)}),
     "1 unexpected: base_model.model.bert.pooler.dense.lora_A.weight"),
    (lambda t: t.update({f"{PREFIX}classifier.weight": torch.zeros(3, 32)}),
     r"1 wrong shape: base_model.model.classifier.weight \(3, 32\) vs \(2, 32\)"),
])
def test_import_rejects_mismatched_tensors(tmp_path, corrupt, message):
    path = _peft_adapter(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match=message):
        import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)


def test_import_needs_safetensors(tmp_path):
    path = _peft_adapter(tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="adapter_model.bin .*reads only adapter_model.safetensors"):
        import_peft(tiny_model("bert", task="seq_cls", num_labels=2), path)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    two = parse_recipe("""
name: t
rules:
  - {name: a, match: {path: "model.layers.*.self_attn.q_proj"}, adapter: {kind: ina, rank: 4}}
  - {name: b, match: {path: "model.layers.*.self_attn.k_proj"}, adapter: {kind: ina, rank: 8}}
""")
    with pytest.raises(GraftrError, match="one config for all modules"):
        export_peft(graft(tiny_model("llama"), two), tmp_path / "x")
    gelu = graft(tiny_model("llama"), parse_recipe(_recipe(LLAMA_QK, activation="gelu")))
    with pytest.raises(GraftrError, match="always applies leaky_relu"):
        export_peft(gelu, tmp_path / "x")
    mixed = graft(tiny_model("llama"), parse_recipe(_recipe(LLAMA_QK) + """
  - {name: scale, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3, scale: input}}
"""))
    with pytest.raises(GraftrError, match="this model has ia3, ina"):  # one PEFT config holds one kind
        export_peft(mixed, tmp_path / "x")
    assert not (tmp_path / "x").exists()
