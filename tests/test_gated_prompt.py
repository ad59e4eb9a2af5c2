"""Gated prompts (LLaMA-Adapter, non-linear prompts): attention sites, identity at init, equality with references
computed inside the HF models themselves, the prompt generators, parameter counts, PEFT's AdaptionPrompt."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ARCHS, example_inputs, tiny_config, tiny_model

from graftr import graft, passes
from graftr.adapters.prompts import ACTIVATIONS, Hypernetwork, SharedMLP
from graftr.grafted import summary
from graftr.models import AUTO_CLASSES, build_model, infer_task, resolve
from graftr.recipe import load_recipe, parse_recipe
from graftr.registry import kinds
from graftr.sites import Rows, find_sites
from graftr.trace import to_graph_module

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ATTENTION = """
name: t
rules:
  - name: gp
    match: {match}
    adapter: {{kind: gated_prompt, length: 3, {options}}}
"""


def recipe(options: str = "", match: str = "{op: attention}"):
    return parse_recipe(ATTENTION.format(match=match, options=options))


def eager_model(arch: str, **overrides):
    """A zoo model built with eager attention (the matmul/softmax/matmul pattern in the graph instead of SDPA)."""
    torch.manual_seed(0)
    config = tiny_config(arch, **overrides)
    model = AUTO_CLASSES[infer_task(config)].from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---- a reference computed by the HF model itself ------------------------------------------------------------
# Every architecture here calls ``ALL_ATTENTION_FUNCTIONS.get_interface(...)(module, query, key, value, mask,
# scaling=..., ...)`` with the query after RoPE and the key/value before repeat_kv. Wrapping that function gives
# the formulas the query, scale and mask HF uses, independently of graftr's graph.

class _Interface:
    def __init__(self, real, wrap):
        self.real, self.wrap = real, wrap

    def get_interface(self, implementation, default):
        base = self.real.get_interface(implementation, default)
        return lambda module, q, k, v, mask, **kw: self.wrap(base, module, q, k, v, mask, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def patch_attention(monkeypatch, model, wrap):
    for module in {sys.modules[type(m).__module__] for m in model.modules()}:
        if hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
            monkeypatch.setattr(module, "ALL_ATTENTION_FUNCTIONS", _Interface(module.ALL_ATTENTION_FUNCTIONS, wrap))


def prompt_kv(module, p, kv_heads, head_dim):
    """K_p, V_p (Hkv, L, hd) through the HF attention module's own projections, written per family."""
    length = p.shape[0]
    if hasattr(module, "c_attn"):  # GPT-2: Conv1D, [q | k | v] on the last dim
        _, k, v = module.c_attn(p).split(module.embed_dim, dim=-1)
    elif hasattr(module, "query_key_value"):  # GPT-NeoX: [q, k, v] inside each head
        _, k, v = module.query_key_value(p).view(length, kv_heads, 3 * head_dim).chunk(3, dim=-1)
    elif hasattr(module, "qkv_proj"):  # Phi-3: [q | k | v]
        width = kv_heads * head_dim
        qkv = module.qkv_proj(p)
        k, v = qkv[:, -2 * width:-width], qkv[:, -width:]
    else:
        k_proj = next(getattr(module, n) for n in ("k_proj", "key", "k") if hasattr(module, n))
        v_proj = next(getattr(module, n) for n in ("v_proj", "value", "v") if hasattr(module, n))
        k, v = k_proj(p), v_proj(p)
    return [t.reshape(length, kv_heads, head_dim).transpose(0, 1).float() for t in (k, v)]


def repeat_kv(t, heads):
    """HF's repeat_kv on (Hkv, L, hd)."""
    kv = t.shape[0]
    return t[:, None].expand(kv, heads // kv, *t.shape[1:]).reshape(heads, *t.shape[1:])


def gated_reference(prompts, gates):
    """O = O_tok + gate(q) · softmax(Q K_pᵀ · scaling) V_p, per HF attention module."""

    def wrap(base, module, q, k, v, mask, scaling=None, **kw):
        out, weights = base(module, q, k, v, mask, scaling=scaling, **kw)
        if module not in prompts:
            return out, weights
        heads, head_dim = q.shape[1], q.shape[-1]
        kp, vp = (repeat_kv(t, heads) for t in prompt_kv(module, prompts[module], k.shape[1], head_dim))
        scale = scaling if scaling is not None else head_dim ** -0.5
        probs = torch.softmax(q.float() @ kp.transpose(-1, -2) * scale, dim=-1)
        branch = gates[module](q) * (probs @ vp)  # (B, H, T, hd); HF returns (B, T, H, hd)
        return out + branch.transpose(1, 2).to(out.dtype), weights

    return wrap


def prefix_reference(prompts):
    """Prefix attention by HF's own attention function with K_p/V_p prepended and the mask extended."""

    def wrap(base, module, q, k, v, mask, **kw):
        if module in prompts:
            kp, vp = prompt_kv(module, prompts[module], k.shape[1], q.shape[-1])
            batch, length = q.shape[0], kp.shape[1]
            k = torch.cat([kp.expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([vp.expand(batch, -1, -1, -1), v], dim=2)
            visible = torch.ones if mask.dtype == torch.bool else torch.zeros
            mask = mask.expand(*mask.shape[:-1], k.shape[2] - length)
            mask = torch.cat([visible(*mask.shape[:-1], length, dtype=mask.dtype), mask], dim=-1)
        return base(module, q, k, v, mask, **kw)

    return wrap


def per_module(model, gm, rule="gp"):
    """{HF attention module: grafted adapter module} for every grafted site."""
    found = {}
    for name, module in model.named_modules():
        try:
            found[module] = gm.get_submodule(f"{name}.{rule}")
        except AttributeError:
            continue
    return found


def tanh_gate(adapter):
    return lambda q: torch.tanh(adapter.gate.detach().float()).view(-1, 1, 1)


def randomize(gm, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


# ---- attention sites --------------------------------------------------------------------------------------

def test_rows_take_selects_fused_features():
    w = torch.arange(24.0)[:, None].expand(24, 3)  # row i holds i
    assert Rows(1, 24, 8, 16).take(w)[:, 0].tolist() == list(range(8, 16))  # [q|k|v]: the middle third
    heads = Rows(2, 12, 4, 8)  # 2 heads of [q,k,v] with hd = 4: k is rows 4..7 and 16..19
    assert heads.take(w)[:, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19] and heads.size == 8
    assert heads.take(w.T, dim=-1)[0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    whole = Rows(1, 24, 0, 24)
    assert whole.take(w) is w


@pytest.mark.slow  # T5 builds with SDPA in transformers 5.23 (covered below); this traces it again, eager (~15 s)
def test_t5_eager_attentions_are_sites_selected_by_path(monkeypatch):
    """T5 traced with eager attention (scale 1, position bias and mask added): encoder self-, decoder self- and
    decoder cross-attention are each a site, selected by path globs; gate 0 is the base, gates follow the formula."""
    model = eager_model("t5")
    globs = {"encoder": "encoder.block.*.layer.0.SelfAttention", "decoder_self": "decoder.block.*.layer.0.SelfAttention",
             "cross": "decoder.block.*.layer.1.EncDecAttention"}
    rules = "\n".join(f"  - {{name: {name}, match: {{path: {glob}, op: attention}}, adapter: {{kind: gated_prompt}}}}"
                      for name, glob in globs.items())
    gm = graft(model, parse_recipe(f"name: t\nrules:\n{rules}\n")).eval()
    sites = gm.site_index.attention
    assert {s.form for s in sites} == {"eager"} and {s.scale for s in sites} == {1.0}
    assert [(p.name, [s.path for s in p.sites]) for p in gm.plans] == [
        (name, [glob.replace("*", str(i)) for i in (0, 1)]) for name, glob in globs.items()]
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
        randomize(gm)
        got = gm(**inputs).logits
    adapters = {m: a for rule in globs for m, a in per_module(model, gm, rule).items()}
    assert len(adapters) == 6
    patch_attention(monkeypatch, model, gated_reference({m: a.prompt.detach() for m, a in adapters.items()},
                                                        {m: tanh_gate(a) for m, a in adapters.items()}))
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=2e-5, rtol=1e-5)


def test_any_module_calling_sdpa_is_causal_is_a_site():
    """A hand-written block (not HF) with ``is_causal=True`` SDPA: found, and prefix mode builds the causal mask."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 16))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 5, 16)
    ep = torch.export.export(net, (x,), dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=64)},), strict=False)
    gm = to_graph_module(ep)
    index = find_sites(gm)
    assert [(s.path, s.num_heads, s.head_dim, s.mask) for s in index.attention] == [
        ("layers.0", 2, 8, None), ("layers.1", 2, 8, None)]
    plans = passes.rewrite(gm, passes.match(index, recipe("mode: prefix", "{op: attention, layers: {last: 1}}")))
    assert gm.get_submodule("layers.1.sdpa").is_causal is False  # the causal mask is explicit now
    prompt = gm.get_parameter("layers.1.gp.prompt").detach()

    def block_with_prefix(m, inputs, out):
        h = inputs[0]
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, 2, 8).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
        kp, vp = (p(prompt).view(1, 3, 2, 8).transpose(1, 2).expand(b, -1, -1, -1) for p in (m.k_proj, m.v_proj))
        mask = torch.cat([torch.ones(t, 3, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], dim=1)
        scores = (q @ torch.cat([kp, k], 2).transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
        o = torch.softmax(scores, -1) @ torch.cat([vp, v], 2)
        return m.o_proj(o.transpose(1, 2).reshape(b, t, 16))

    handle = net.layers[1].register_forward_hook(block_with_prefix)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), atol=1e-6, rtol=0)
    handle.remove()
    assert len(plans[0].sites) == 1


# ---- identity at init and the formulas on every architecture -------------------------------------------------

CASES = [(a, "sdpa") for a in ARCHS if a != "bert"] + [("llama", "eager")]
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 32}}  # ≠ head_dim: the scale is read from the graph, not guessed
# The site geometry: (form, heads, kv heads, head dim, scale, softcap, {role: (groups, stride, start, stop)})
GEOMETRY = {
    "phi3": ("sdpa", 4, 2, 8, 8 ** -0.5, None, {"q": (1, 64, 0, 32), "k": (1, 64, 32, 48), "v": (1, 64, 48, 64)}),
    "gpt_neox": ("sdpa", 4, 4, 8, 8 ** -0.5, None, {"q": (4, 24, 0, 8), "k": (4, 24, 8, 16), "v": (4, 24, 16, 24)}),
    "gpt2": ("sdpa", 4, 4, 8, 8 ** -0.5, None, {"q": (1, 96, 0, 32), "k": (1, 96, 32, 64), "v": (1, 96, 64, 96)}),
    "opt": ("sdpa", 4, 4, 8, 1.0, None, {r: (1, 32, 0, 32) for r in "qkv"}),  # OPT scales the query itself
    "gemma2": ("eager", 4, 2, 8, 32 ** -0.5, 50.0, {"q": (1, 32, 0, 32), "k": (1, 16, 0, 16), "v": (1, 16, 0, 16)}),
    "llama": ("sdpa", 4, 2, 8, 8 ** -0.5, None, {"q": (1, 32, 0, 32), "k": (1, 16, 0, 16), "v": (1, 16, 0, 16)}),
}


@pytest.mark.parametrize("arch,attention", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_gate_zero_is_base_and_random_gates_equal_hf_reference(arch, attention, monkeypatch):
    overrides = OVERRIDES.get(arch, {})
    model = eager_model(arch, **overrides) if attention == "eager" else tiny_model(arch, **overrides)
    gm = graft(model, recipe()).eval()
    assert len(gm.plans[0].sites) == (6 if arch == "t5" else 2)  # T5: encoder self, decoder self and cross
    if arch in GEOMETRY and attention == "sdpa":
        expected = GEOMETRY[arch]
        for site in gm.plans[0].sites:
            rows = {r: (x.groups, x.stride, x.start, x.stop) for r, x in site.rows.items()}
            got = (site.form, site.num_heads, site.num_kv_heads, site.head_dim, site.scale, site.softcap, rows)
            assert got[:4] == expected[:4] and math.isclose(got[4], expected[4]) and got[5:] == expected[5:]
            assert "o" in site.projections
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        base = model(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, base, atol=1e-6, rtol=0)
        randomize(gm)
        got = gm(**inputs).logits
    adapters = per_module(model, gm)
    assert len(adapters) == len(gm.plans[0].sites)
    prompts = {m: a.prompt.detach() for m, a in adapters.items()}
    gates = {m: tanh_gate(a) for m, a in adapters.items()}
    patch_attention(monkeypatch, model, gated_reference(prompts, gates))
    with torch.no_grad():
        expected = model(**inputs).logits
    assert (got - base).abs().max() > 1e-2  # the gates open
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_adapt_gate_reads_the_query_before_rope(monkeypatch):
    model = tiny_model("llama")
    gm = graft(model, recipe("gate: adapt")).eval()
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
        randomize(gm)
        got = gm(**inputs).logits
    adapters = per_module(model, gm)
    pre_rope = {}
    for module in adapters:  # the q projection's output, split into heads
        module.q_proj.register_forward_hook(
            lambda m, i, o, key=module: pre_rope.__setitem__(key, o.unflatten(-1, (4, 8)).transpose(1, 2)))
    gates = {m: (lambda q, m=m, w=a.gate.detach(): torch.tanh(pre_rope[m] @ w.unsqueeze(-1)))
             for m, a in adapters.items()}
    patch_attention(monkeypatch, model, gated_reference({m: a.prompt.detach() for m, a in adapters.items()}, gates))
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=2e-5, rtol=1e-5)
    assert {a.gate.shape for a in adapters.values()} == {(4, 8)}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # SDPA with GQA; eager with softcapping and sliding window
def test_prefix_mode_equals_joint_softmax(arch, monkeypatch):
    model = tiny_model(arch)
    gm = graft(model, recipe("mode: prefix")).eval()
    assert all(not hasattr(a, "gate") for a in gm.adapter_modules().values())
    inputs = example_inputs(model, 3, 9)
    with torch.no_grad():
        got = gm(**inputs).logits
    prompts = {m: a.prompt.detach() for m, a in per_module(model, gm).items()}
    patch_attention(monkeypatch, model, prefix_reference(prompts))
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=2e-5, rtol=1e-5)


def test_scalar_gate_equals_peft_adaption_prompt():
    """PEFT adds its branch after o_proj: identical to graftr's (before o_proj) as Llama's o_proj has no bias."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", num_hidden_layers=3)
    gm = graft(model, recipe("gate: scalar", "{op: attention, layers: {last: 2}}")).eval()
    randomize(gm)
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        got = gm(**inputs).logits
    peft_model = peft.get_peft_model(model, peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2,
                                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for i in (1, 2):
            ours = gm.get_submodule(f"model.layers.{i}.self_attn.gp")
            theirs = peft_model.get_submodule(f"base_model.model.model.layers.{i}.self_attn")
            theirs.adaption_prompt.copy_(ours.prompt[None])
            theirs.adaption_gate.copy_(ours.gate)
        torch.testing.assert_close(got, peft_model(**inputs).logits, atol=2e-5, rtol=1e-5)


# ---- prompt generators and the shared module ------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [64, 0])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_hypernetwork_equals_formula(activation, hidden):
    torch.manual_seed(0)
    net = Hypernetwork(num_layers=5, dim=12, length=3, embedding_dim=8, hidden=hidden, activation=activation)
    c = 1e-3 * math.sqrt(3 / ((hidden or 8) * 12))
    w2, b2 = net.mlp.w2.weight, net.mlp.w2.bias
    assert w2.abs().max() <= c and torch.all(b2 == 0) and w2.shape == (36, hidden or 8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # any weights: the formula must hold for all
    sigma = {"relu": torch.relu, "leaky_relu": lambda t: torch.where(t > 0, t, 0.1 * t), "tanh": torch.tanh,
             "sigmoid": torch.sigmoid, "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))}[activation]
    e = net.layer_embedding[3]
    flat = (w2 @ sigma(net.mlp.w1.weight @ e + net.mlp.w1.bias) + b2) if hidden else sigma(w2 @ e + b2)
    torch.testing.assert_close(net(3), flat.view(3, 12).detach())


def test_shared_mlp_equals_formula():
    torch.manual_seed(0)
    net = SharedMLP(layers=[7, 5, 6], dim=12, length=3, embedding_dim=16, hidden=4, activation="relu")
    assert net.table.shape == (9, 16)
    rows = net.table[3:6]  # layer 6 is the second prompted layer
    w1, w2 = net.mlp.w1, net.mlp.w2
    expected = torch.relu(rows @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias
    torch.testing.assert_close(net(6), expected.detach())


def test_hypernetwork_is_shared_once_and_the_block_equals_the_reference(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    gm = graft(model, recipe("prompt: hypernetwork, hidden: 16", "{op: attention, layers: {last: 2}}")).eval()
    plan = gm.plans[0]
    assert plan.shared == ["model.layers.gp"]
    trainable = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    assert trainable == sorted([
        "model.layers.gp.layer_embedding", "model.layers.gp.mlp.w1.weight", "model.layers.gp.mlp.w1.bias",
        "model.layers.gp.mlp.w2.weight", "model.layers.gp.mlp.w2.bias",
        "model.layers.1.self_attn.gp.gate", "model.layers.2.self_attn.gp.gate"])
    assert trainable == sorted(gm.adapter_state_dict())
    net = gm.get_submodule("model.layers.gp")
    assert plan.params_added == 3 * 64 + (64 * 16 + 16) + (16 * 3 * 32 + 3 * 32) + 2 * 4 == gm.trainable_counts()[0]
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
        randomize(gm)
        got = gm(**inputs).logits
    e, w1, w2 = net.layer_embedding.detach(), net.mlp.w1, net.mlp.w2
    prompts, gates = {}, {}
    for i in (1, 2):  # P_l = W2 relu(W1 E[l] + b1) + b2, reshaped to (L, D); E indexed by the absolute layer
        attention = model.model.layers[i].self_attn
        prompts[attention] = (w2.weight @ torch.relu(w1.weight @ e[i] + w1.bias) + w2.bias).detach().view(3, 32)
        gates[attention] = tanh_gate(gm.get_submodule(f"model.layers.{i}.self_attn.gp"))
    patch_attention(monkeypatch, model, gated_reference(prompts, gates))
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=2e-5, rtol=1e-5)


# ---- parameter counts of the shipped recipes ----------------------------------------------------------------

@pytest.mark.slow  # two traces of the Llama-2-7B structure on the meta device (~15 s each)
def test_shipped_recipes_count_the_published_parameters_on_llama2_7b():
    config = resolve("meta-llama/Llama-2-7b-hf").config
    heads, dim, layers, length, k = 32, 4096, 32, 10, 30
    linear = graft(build_model(config, device="meta"), load_recipe(RECIPES / "llama_adapter.yaml"))
    assert summary(linear)["rules"][0]["sites"] == k
    assert linear.trainable_counts()[0] == k * length * dim + k * heads == 1_229_760
    nonlinear = graft(build_model(config, device="meta"), load_recipe(RECIPES / "llama_adapter_nonlinear.yaml"))
    hypernetwork = layers * 64 + (64 * 64 + 64) + (64 * length * dim + length * dim)
    assert hypernetwork == 2_668_608
    assert nonlinear.trainable_counts()[0] == hypernetwork + k * heads == 2_669_568
    # Prompts start around 1e-5: with W2 ~ U(−c, c), E|P_i| = √(2/π) · c/√3 · ‖σ(W1 E[l] + b1)‖.
    net = nonlinear.get_submodule("model.layers.llama_adapter_nl")
    c = 1e-3 * math.sqrt(3 / (64 * dim))
    with torch.no_grad():
        for layer in range(layers - k, layers):
            hidden = torch.relu(net.mlp.w1(net.layer_embedding[layer]))
            expected = math.sqrt(2 / math.pi) * c / math.sqrt(3) * hidden.norm().item()
            mean = net(layer).abs().mean().item()
            assert 0.9 * expected < mean < 1.1 * expected and 1e-6 < mean < 1e-4


@pytest.mark.parametrize("name,per_site,shared", [
    ("llama_adapter.yaml", 10 * 32 + 4, 0),
    ("llama_adapter_nonlinear.yaml", 4, 4 * 64 + (64 * 64 + 64) + (64 * 10 * 32 + 10 * 32)),
])
def test_shipped_recipes_match_exactly_on_a_tiny_llama(name, per_site, shared):
    text = (RECIPES / name).read_text()
    assert text.splitlines()[0] == f"# graftr apply recipes/{name} --model meta-llama/Llama-2-7b-hf"
    gm = graft(tiny_model("llama", num_hidden_layers=4), parse_recipe(text.replace("last: 30", "last: 2")))
    [plan] = gm.plans
    assert [s.path for s in plan.sites] == ["model.layers.2.self_attn", "model.layers.3.self_attn"]
    assert plan.params_added == gm.trainable_counts()[0] == 2 * per_site + shared


# ---- composition, modes, dtypes -----------------------------------------------------------------------------

def test_composes_with_ia3_each_rule_reported(monkeypatch):
    model = tiny_model("llama")
    gm = graft(model, parse_recipe("""
name: t
rules:
  - {name: gp, match: {op: attention}, adapter: {kind: gated_prompt, length: 3}}
  - {name: ia3, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
""")).eval()
    rules = summary(gm)["rules"]
    assert [(r["rule"], r["kind"], r["sites"], r["params"]) for r in rules] == [
        ("gp", "gated_prompt", 2, 2 * (3 * 32 + 4)), ("ia3", "ia3", 4, 4 * 16)]
    randomize(gm)
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        got = gm(**inputs).logits
    adapters = per_module(model, gm)
    for name, module in gm.adapter_modules().items():
        if name.endswith(".ia3"):  # IA³ scales the tokens' keys/values; the prompt goes through the frozen weights
            model.get_submodule(name[:-4]).register_forward_hook(
                lambda m, i, o, l=module.ia3_l.detach(): o * l if i[0].dim() == 3 else o)
    patch_attention(monkeypatch, model, gated_reference({m: a.prompt.detach() for m, a in adapters.items()},
                                                        {m: tanh_gate(a) for m, a in adapters.items()}))
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, atol=2e-5, rtol=1e-5)


def test_composes_with_ina():
    if "ina" not in kinds():
        pytest.skip("the ina adapter kind is not registered")
    model = tiny_model("llama")
    gm = graft(model, parse_recipe("""
name: t
rules:
  - {name: gp, match: {op: attention, layers: {last: 1}}, adapter: {kind: gated_prompt, length: 3}}
  - {name: ina, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, adapter: {kind: ina, rank: 2}}
""")).eval()
    assert [(p.name, len(p.sites), p.params_added) for p in gm.plans] == [
        ("gp", 1, 3 * 32 + 4), ("ina", 4, 2 * 2 * (32 + 32) + 2 * 2 * (32 + 16))]
    assert gm.trainable_counts()[0] == sum(p.params_added for p in gm.plans)
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_train_and_eval_switch_the_attention_dropout():
    model = tiny_model("llama", attention_dropout=0.5)
    gm = graft(model, recipe())
    inputs = example_inputs(model, 2, 7)
    with torch.no_grad():
        gm.train()
        assert all(m.training for m in gm.adapter_modules().values())
        assert not torch.equal(gm(**inputs).logits, gm(**inputs).logits)
        gm.eval()
        assert not any(m.training for m in gm.adapter_modules().values())
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_bf16_base_keeps_fp32_parameters_and_identity():
    model = tiny_model("llama").to(torch.bfloat16)
    gm = graft(model, recipe("prompt: hypernetwork")).eval()
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}
    inputs = example_inputs(model, 2, 5)
    with torch.no_grad():
        out = gm(**inputs).logits
        assert out.dtype == torch.bfloat16 and torch.equal(out, model(**inputs).logits)
        randomize(gm)
        assert gm(**inputs).logits.dtype == torch.bfloat16


def test_config_rejects_unknown_keys_and_warns_on_unused_options():
    with pytest.raises(Exception, match="gatee"):
        recipe("gatee: scalar")
    with pytest.warns(UserWarning, match="hidden has no effect with prompt 'linear'"):
        recipe("hidden: 8")
    with pytest.warns(UserWarning, match="gate has no effect .* mode 'prefix'"):
        recipe("mode: prefix, gate: scalar")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = recipe("prompt: shared_mlp").rules[0].adapter
    assert config.embedding_dim == 256  # the official deepshare table width
