"""Zero-init gated prompts on attention blocks: LLaMA-Adapter and non-linear prompts.

* Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
  https://arxiv.org/abs/2303.16199 — linear prompts, zero-initialised per-head tanh gates.
* Diep et al., ICML 2025, "On Zero-Initialized Attention: Optimal Prompt and Gating Factor Estimation",
  https://arxiv.org/abs/2502.03029 — the prompt produced by a shared hypernetwork (non-linear prompts).

For each selected attention block with query ``Q`` (B, H, T, hd) *after* RoPE and attention output ``O_tok``::

    K_p = k_proj(P_l),  V_p = v_proj(P_l)        the block's own frozen projections, bias included; no RoPE on K_p
    S_p = Q · K_pᵀ · scale                         the block's scale (1/√hd; T5: 1; Gemma-2: query_pre_attn_scalar^-½)
    O   = O_tok + gate · softmax(S_p) · V_p        separate softmax over the L prompt tokens (fp32), per head
    y   = o_proj(O)                                the branch joins before o_proj

Every token sees every prompt token. With GQA/MQA the prompt is projected to Hkv heads and repeated to H heads
with the model's grouping (HF ``repeat_kv``: query head h uses key head h // (H/Hkv)). ``K_p``/``V_p`` are
computed once per forward and broadcast over the batch. The projection weights enter the adapter's graph node as
``get_attr`` inputs (no alias of a base parameter lives in the adapter), so other adapters on ``k_proj``/``v_proj``
do not act on the prompt. The branch is computed in fp32 and cast to the attention output's dtype.

Options (:class:`GatedPromptConfig`):

* ``prompt``: ``linear`` — ``P_l ∈ R^{L×D}`` per site, N(0,1) (LLaMA-Adapter); ``hypernetwork`` and
  ``shared_mlp`` — produced by one module shared by the rule's sites, see :mod:`graftr.adapters.prompts`.
* ``gate``: ``per_head_tanh`` — ``tanh(g_h)``, ``g ∈ R^H`` zero init (the official LLaMA-Adapter training code);
  ``scalar`` — one ``g`` per site, no tanh, zero init (HF PEFT ``AdaptionPrompt``); ``adapt`` — query-dependent
  ``tanh(q_h · w_h)`` per head and token, ``w ∈ R^{H×hd}`` zero init, ``q`` the query *before* RoPE, taken from
  the q projection's output split into heads (Diep et al.'s ``typ_gate=adapt``).
* ``mode``: ``gated`` (above) or ``prefix`` — conventional prefix attention, the baseline of Diep et al.: ``K_p``,
  ``V_p`` are prepended to the keys and values and join the tokens' softmax (same scale and softcap), visible to
  every query, with no gate (so ``prefix`` is not the identity at init).

Every gate starts at zero, so a ``gated`` model starts exactly equal to its base model.
"""

from __future__ import annotations

import json
import math
import operator

import torch
from torch import fx, nn

from graftr import fxmeta, quantize
from graftr.adapters.base import Adapter, _tag
from graftr.adapters.config import GatedPromptConfig
from graftr.adapters.prompts import Hypernetwork, SharedMLP
from graftr.errors import GraftrError
from graftr.formats import peft as fmt
from graftr.formats.graftr import load_state_into
from graftr.grafted import GraftedModel, graft, prepare
from graftr.names import torch_dtype
from graftr.registry import register_adapter
from graftr.sites import SOFTMAX_OPS
from graftr.vision import visual_node

def _prepend(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``cat([prefix, x], dim=2)`` with ``prefix`` (heads, L, ·) broadcast over x's batch."""
    return torch.cat([prefix.to(x.dtype).expand(x.shape[0], -1, -1, -1), x], dim=2)


@register_adapter(GatedPromptConfig, ops=("attention",))
class GatedPrompt(Adapter):
    """The per-site module of ``gated_prompt`` (``mode: gated``): ``O_tok + gate · softmax(S_p) · V_p``."""

    peft_type = "ADAPTION_PROMPT"
    identity_arg = 0  # off, the node returns O_tok, the attention output it received

    @classmethod
    def from_peft(cls, model, config: dict, tensors: dict, where: str):
        return _import_adaption_prompt(model, config, tensors, where)

    @classmethod
    def to_peft(cls, gm) -> tuple[dict, dict]:
        return _export_adaption_prompt(gm)

    def __init__(self, site, config: GatedPromptConfig, device=None, shared: str | None = None):
        super().__init__()
        k, v = site.projection("k"), site.projection("v")
        (k_site, self.k_rows), (v_site, self.v_rows) = k, v
        self.k_layout, self.v_layout = k_site.layout, v_site.layout
        self.k_params, self.v_params = (k_site.weight, k_site.bias), (v_site.weight, v_site.bias)
        self.k_path, self.v_path = k_site.path, v_site.path  # a quantized projection is read dequantized
        self.length, self.dim = config.length, k_site.in_features
        self.num_heads, self.num_kv_heads, self.head_dim = site.num_heads, site.num_kv_heads, site.head_dim
        self.scale, self.softcap, self.form = site.scale, site.softcap, site.form
        self.gate_kind = config.gate
        self.image = config.condition == "image"
        self.shared, self.layer = shared, site.layer[1] if site.layer else None
        dtype = torch_dtype(config.dtype)
        if shared is None:
            self.prompt = nn.Parameter(torch.randn(config.length, self.dim, dtype=dtype, device=device))
        if config.mode == "gated":
            shape = {"per_head_tanh": (self.num_heads,), "scalar": (1,),
                     "adapt": (self.num_heads, self.head_dim)}[config.gate]
            self.gate = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if config.gate == "adapt" and config.mode == "gated":
            self.q_rows = site.projection("q")[1]

    # ---- building -------------------------------------------------------------------------------------------
    @staticmethod
    def _check(site, config: GatedPromptConfig) -> None:
        needed = ["k", "v"] + (["q"] if config.gate == "adapt" and config.mode == "gated" else [])
        missing = [r for r in needed if site.projection(r) is None]
        if missing:
            raise GraftrError(f"gated_prompt: cannot find the {'/'.join(missing)} projection of the attention at "
                              f"{site.path} ({site.module_class}); the prompt is projected with the block's own "
                              "projections")
        if site.num_heads % site.num_kv_heads:
            raise GraftrError(f"gated_prompt: {site.path} has {site.num_heads} query heads for "
                              f"{site.num_kv_heads} key/value heads")

    @classmethod
    def from_site(cls, config: GatedPromptConfig, site, *, device, shared: str | None = None) -> GatedPrompt:
        cls._check(site, config)
        return (PrefixPrompt if config.mode == "prefix" else GatedPrompt)(site, config, device, shared)

    @classmethod
    def shared_for_rule(cls, config: GatedPromptConfig, sites, *, stack_size, device) -> nn.Module | None:
        if config.prompt == "linear":
            return None
        outside = [s.path for s in sites if s.layer is None]
        if outside or stack_size is None:
            raise GraftrError(f"gated_prompt: prompt {config.prompt!r} gives each layer of a stack its own prompt, "
                              f"but {outside[0] if outside else sites[0].path} is not in a numbered layer stack")
        for site in sites:
            cls._check(site, config)
        dims = {s.projection("k")[0].in_features for s in sites}
        if len(dims) != 1:
            raise GraftrError(f"gated_prompt: the rule's attention blocks take different widths {sorted(dims)}; "
                              "one prompt generator needs one width")
        options = (config.length, config.embedding_dim, config.hidden, config.activation, torch_dtype(config.dtype), device)
        if config.prompt == "hypernetwork":
            return Hypernetwork(stack_size, dims.pop(), *options)
        return SharedMLP(sorted({s.layer[1] for s in sites}), dims.pop(), *options)

    # ---- graph ----------------------------------------------------------------------------------------------
    def _inputs(self, graph: fx.Graph) -> list:
        """Nodes for the k/v projection weights and biases, and the shared generator's prompt (or None)."""
        attrs: dict[str, fx.Node] = {}

        def attr(name, path=None):
            if name is not None and name not in attrs:
                attrs[name] = graph.get_attr(name) if path is None else quantize.dense_weight(graph, path, name)
            return attrs.get(name)

        nodes = [attr(self.k_params[0], self.k_path), attr(self.k_params[1]), attr(self.v_params[0], self.v_path),
                 attr(self.v_params[1])]
        return nodes + [graph.call_module(self.shared, (self.layer,)) if self.shared else None]

    def graft(self, graph: fx.Graph, site, target: str) -> list[fx.Node]:
        old = site.output
        q_out = site.projection("q")[0].output if self.gate_kind == "adapt" else None
        visual = visual_node(graph) if self.image else None
        with graph.inserting_before(old.next):
            new = graph.call_module(target, (old, site.query, *self._inputs(graph), q_out, visual))
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        _tag(new, old, target, type(self).__name__)
        site.output = new
        return [new]

    # ---- math -----------------------------------------------------------------------------------------------
    def prompt_kv(self, prompt, wk, bk, wv, bv) -> tuple[torch.Tensor, torch.Tensor]:
        """``K_p``, ``V_p`` (Hkv, L, hd) in fp32 through the block's projections (Conv1D weights are (in, out));
        an image-conditioned prompt (B, L, D) gives (B, Hkv, L, hd)."""
        p = prompt.float()
        out = []
        for w, b, rows, layout in ((wk, bk, self.k_rows, self.k_layout), (wv, bv, self.v_rows, self.v_layout)):
            w = rows.take(w.t() if layout == "in_out" else w).float()
            y = p @ w.t() + (rows.take(b).float() if b is not None else 0.0)
            out.append(y.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-3, -2))
        return out[0], out[1]

    def _repeat(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """(…, Hkv, L, ·) → (…, heads, L, ·) grouped as HF's repeat_kv: head h reads key/value head h // (heads/Hkv)."""
        return t.repeat_interleave(heads // t.shape[-3], dim=-3) if heads != t.shape[-3] else t

    def _gate(self, q_out) -> torch.Tensor:
        g = self.gate.float()
        if self.gate_kind == "scalar":
            return g  # (1,), PEFT's adaption_gate: no tanh
        if self.gate_kind == "per_head_tanh":
            return torch.tanh(g).view(-1, 1, 1)
        q = self.q_rows.take(q_out, -1).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        return torch.tanh(q.float() @ g.unsqueeze(-1))  # (B, H, T, 1)

    def forward(self, out, q, wk, bk, wv, bv, prompt=None, q_out=None, visual=None):
        prompt = self.prompt if prompt is None else prompt
        if visual is not None:  # P_l + repeat(I_p): (B, L, D), one prompt per image
            prompt = prompt.float() + visual.float()[:, None, :]
        keys, values = self.prompt_kv(prompt, wk, bk, wv, bv)
        keys, values = self._repeat(keys, self.num_heads), self._repeat(values, self.num_heads)
        probs = torch.softmax((q.float() @ keys.transpose(-1, -2)) * self.scale, dim=-1)  # (B, H, T, L)
        # gate·(P·V_p) as (gate·P)·V_p: backward keeps the (B, H, T, L) gated probabilities, not a (B, H, T, hd)
        # product (L prompt tokens are fewer than hd; PEFT's AdaptionPrompt gates the scores the same way)
        return out + ((self._gate(q_out) * probs) @ values).to(out.dtype)

    def extra_repr(self) -> str:
        prompt = f"shared={self.shared}" if self.shared else f"prompt=({self.length}, {self.dim})"
        return (f"{prompt}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:g}" + (f", gate={self.gate_kind}" if hasattr(self, "gate") else ""))


class PrefixPrompt(GatedPrompt):
    """``mode: prefix``: ``K_p``/``V_p`` prepended to the keys and values; one softmax over prompts and tokens.

    On an SDPA site the call's keys, values and mask are replaced (an ``is_causal`` call gets the explicit causal
    mask, ``tril(ones(T, S))`` as SDPA builds it, extended by L visible prompt columns). On an eager site the
    prompt scores (same scale and softcap as the tokens', no mask) are prepended to what softmax reads and the
    prompt values to what the second matmul reads, so the model's own softmax and dropout act on the whole row.
    """

    causal = False  # set when the SDPA call was is_causal: the adapter then builds the causal mask

    def graft(self, graph: fx.Graph, site, target: str) -> list[fx.Node]:
        eager = site.form == "eager"
        replaced = (site.scores, site.value) if eager else (site.key, site.value, site.mask)
        anchor = next(u for u in site.scores.users if u.target in SOFTMAX_OPS) if eager else site.node
        order = {n: i for i, n in enumerate(graph.nodes)}
        if eager and order[site.value] > order[anchor]:
            raise GraftrError(f"gated_prompt (prefix): the values of {site.path} are computed after its softmax")
        with graph.inserting_before(anchor):
            inputs = (site.query, replaced[0], site.value, None if eager else site.mask)
            new = graph.call_module(target, (*inputs, *self._inputs(graph)))
            parts = [graph.call_function(operator.getitem, (new, i)) for i in range(len(replaced))]
        _tag(new, site.node, target, type(self).__name__)
        fxmeta.drop_value(new)  # the module returns a tuple
        for part, like in zip(parts, replaced):
            fxmeta.copy_meta(like if like is not None else site.node, part)
        if eager:
            site.scores.replace_all_uses_with(parts[0], delete_user_cb=lambda user: user is not new)
            site.node.replace_input_with(site.value, parts[1])
            site.scores, site.value = parts
        else:
            sdpa = graph.owning_module.get_submodule(site.node.target)
            if sdpa.is_causal:
                self.causal, sdpa.is_causal = True, False  # the causal mask is now explicit in the extended mask
            site.node.args = (site.query, *parts)
            site.key, site.value, site.mask = parts
        return [new, *parts]

    identity_arg = None  # off, it returns the keys (scores), values and mask it received: see passthrough

    def passthrough(self, q, keys_or_scores, values, mask, *rest):
        """The attention's own inputs. On an SDPA site that was causal, the call lost ``is_causal`` when the prompt
        was grafted, so the causal mask comes explicitly (equal to the base up to SDPA's kernel choice)."""
        if self.form == "eager":
            return keys_or_scores, values
        if mask is None and self.causal:
            mask = torch.ones(q.shape[-2], keys_or_scores.shape[-2], dtype=torch.bool, device=q.device).tril()
        return keys_or_scores, values, mask

    def forward(self, q, keys_or_scores, values, mask, wk, bk, wv, bv, prompt=None):
        keys, vals = self.prompt_kv(self.prompt if prompt is None else prompt, wk, bk, wv, bv)
        if self.form == "eager":  # keys_or_scores: the (B, H, T, S) scores softmax reads
            scores = (q.float() @ self._repeat(keys, q.shape[1]).transpose(-1, -2)) * self.scale
            if self.softcap is not None:
                scores = self.softcap * torch.tanh(scores / self.softcap)
            return (torch.cat([scores.to(keys_or_scores.dtype), keys_or_scores], dim=-1),
                    _prepend(self._repeat(vals, values.shape[1]), values))
        heads = keys_or_scores.shape[1]  # Hkv (SDPA's enable_gqa) or H (keys already repeated)
        keys = _prepend(self._repeat(keys, heads), keys_or_scores)
        values = _prepend(self._repeat(vals, heads), values)
        if mask is None and self.causal:
            t, s = q.shape[-2], keys_or_scores.shape[-2]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            mask = mask.expand(*mask.shape[:-1], keys_or_scores.shape[-2])
            visible = True if mask.dtype == torch.bool else 0.0
            mask = torch.cat([mask.new_full((*mask.shape[:-1], self.length), visible), mask], dim=-1)
        return keys, values, mask


# ---- AdaptionPrompt (graftr kind `gated_prompt`, prompt linear, gate scalar) --------------------------------------
# PEFT's AdaptedAttention (peft/tuners/adaption_prompt/layer.py) on llama/mistral: the prompt (1, L, D) through the
# block's k_proj/v_proj (repeat_interleave'd to the query heads), scores against the query recomputed with RoPE,
# scaled by 1/√head_dim, fp32 softmax, times the scalar `adaption_gate` (no tanh), then o_proj of that branch added
# to the block's output. o_proj(O_tok) + o_proj(branch) = o_proj(O_tok + branch) when o_proj has no bias.
_AP_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "target_modules", "adapter_len", "adapter_layers"}
_AP_MODEL_TYPES = ("llama", "mistral")  # PEFT's TRANSFORMERS_MODEL_CONFIG also has gpt2, a different model (below)
_AP_TARGET = "self_attn"
_AP_NAMES = {"prompt": "adaption_prompt", "gate": "adaption_gate"}
_GPT2_DIFFERENCE = (
    "PEFT's GPT-2 AdaptionPrompt (AdaptedAttentionGPT; o_proj_layer=None in TRANSFORMERS_MODEL_CONFIG) adds the gated "
    "prompt attention gate·softmax(S_p)·V_p to the attention output after c_proj without projecting it through "
    "c_proj, whereas graftr's gated_prompt (LLaMA-Adapter) joins the branch before the output projection, "
    "c_proj(O_tok + gate·softmax(S_p)·V_p); they are different models")


def _ap_sites(gm: GraftedModel, where: str) -> list:
    """The attention blocks PEFT's AdaptionPrompt may prompt, in layer order, after checking that the model is one
    where PEFT computes exactly graftr's gated prompt."""
    cfg, model_type = gm.hf_config, gm.hf_config.model_type
    if model_type == "gpt2":
        raise GraftrError(f"{where}: {_GPT2_DIFFERENCE}; refusing rather than produce a different model")
    if model_type not in _AP_MODEL_TYPES:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt supports only llama, mistral and gpt2 models, not "
                          f"{model_type!r}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.hidden_size != cfg.num_attention_heads * head_dim:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt derives the key/value heads from k_proj's in/out ratio, "
                          f"which assumes hidden_size = heads × head_dim; this model has {cfg.hidden_size} vs "
                          f"{cfg.num_attention_heads} × {head_dim}")
    sites = [s for s in gm.site_index.attention if s.path.endswith(f".{_AP_TARGET}")]
    if not sites:
        raise GraftrError(f"{where}: no attention block named *.{_AP_TARGET} in {gm.hf_class}")
    return sites


def _ap_check_blocks(sites: list, where: str) -> None:
    """PEFT adds o_proj's bias a second time and always scales by 1/√head_dim: refuse blocks where that differs."""
    for site in sites:
        o_proj = site.projections.get("o")
        if o_proj is None:
            raise GraftrError(f"{where}: graftr cannot find the o_proj of {site.path}, so it cannot check that PEFT's "
                              "AdaptionPrompt (which adds o_proj(branch) after o_proj) computes the same model")
        if o_proj.bias is not None:
            raise GraftrError(f"{where}: {o_proj.path} has a bias; PEFT's AdaptionPrompt adds o_proj(branch) after "
                              "o_proj, so it adds the bias twice (a zero gate is then no longer the base model), while "
                              "graftr joins the branch before o_proj; refusing rather than produce a different model")
        if not math.isclose(site.scale, site.head_dim ** -0.5, rel_tol=1e-6):
            raise GraftrError(f"{where}: {site.path} scales its scores by {site.scale:g}, PEFT's AdaptionPrompt "
                              f"always by 1/√head_dim = {site.head_dim ** -0.5:g}")


def _import_adaption_prompt(model, config: dict, tensors: dict, where: str) -> GraftedModel:
    fmt.check_options(config, _AP_KNOWN, {}, where)
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise GraftrError(f"{where}: task_type {config['task_type']!r}: AdaptionPrompt (LLaMA-Adapter) adapters are "
                          "imported for causal language models only")
    length, layers = config.get("adapter_len"), config.get("adapter_layers")
    for key, value in (("adapter_len", length), ("adapter_layers", layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GraftrError(f"{where}: {key} must be a positive integer, not {json.dumps(value)}")
    model_id = config.get("base_model_name_or_path")
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id, task="causal_lm")
    if gm.task != "causal_lm":
        raise GraftrError(f"{where}: an AdaptionPrompt adapter needs a causal_lm model, not {gm.task}")
    sites = _ap_sites(gm, where)
    if (config.get("target_modules") or _AP_TARGET) != _AP_TARGET:
        raise GraftrError(f"{where}: target_modules {config['target_modules']!r}: PEFT's AdaptionPrompt computes the "
                          f"query of a llama/mistral attention module; graftr imports only the default "
                          f"{_AP_TARGET!r}")
    if layers > len(sites):
        raise GraftrError(f"{where}: adapter_layers {layers} is more than the {len(sites)} attention blocks of "
                          f"{gm.hf_class}")
    chosen = sites[-layers:]  # PEFT: the last adapter_layers modules named *.self_attn
    _ap_check_blocks(chosen, where)
    match = fmt.as_path_match({s.path for s in chosen}, gm, [{"op": "attention", "layers": {"last": layers}}],
                           gm.site_index.attention)
    adapter = {"kind": "gated_prompt", "length": length, "prompt": "linear", "gate": "scalar", "mode": "gated"}
    rules = [{"name": "adaption_prompt", "match": match, "adapter": adapter}]
    recipe = fmt.build_recipe({**fmt.recipe_data(gm, config, where, [], rules), "task": "causal_lm"}, where)
    gm = graft(gm, recipe, model_id=model_id)
    shapes = {f"{t}.prompt": (1, length, m.dim) for t, m in gm.adapter_modules().items()}
    load_state_into(gm, fmt.checked_tensors(gm, tensors, fmt.peft_keys(gm, rename=_AP_NAMES), where, shapes), where)
    return gm


def _export_adaption_prompt(gm: GraftedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    where = "PEFT AdaptionPrompt export"
    for plan in gm.plans:
        cfg = plan.rule.adapter
        reasons = {
            "mode": f"mode {cfg.mode!r} (prompts joining the tokens' softmax, no gate)",
            "gate": {"per_head_tanh": "gate 'per_head_tanh' (tanh of one gate per head; PEFT has one scalar gate per "
                                      "layer, used without tanh)",
                     "adapt": "gate 'adapt' (a query-dependent gate; PEFT's gate is one learned scalar per layer)"
                     }.get(cfg.gate),
            "prompt": f"prompt {cfg.prompt!r} (PEFT stores each layer's prompt itself, not a network generating it)",
            "condition": "condition 'image' (prompts conditioned on an image; PEFT's AdaptionPrompt takes no image)",
        }
        wanted = {"mode": "gated", "gate": "scalar", "prompt": "linear", "condition": "none"}
        for field, value in wanted.items():
            if getattr(cfg, field) != value:
                raise GraftrError(f"{where}: rule {plan.name!r} has {reasons[field]}; PEFT's AdaptionPrompt is "
                                  "gated_prompt with prompt: linear, gate: scalar, mode: gated only")
    lengths = sorted({plan.rule.adapter.length for plan in gm.plans})
    if len(lengths) != 1:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt has one adapter_len for all layers; these rules use "
                          f"{lengths}")
    if gm.task != "causal_lm":
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt is for causal language models; this model is {gm.task}")
    if gm.recipe.trainable_modules:
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt saves only the prompts and gates; the trainable modules "
                          f"{gm.recipe.trainable_modules} would be lost")
    candidates = _ap_sites(gm, where)
    sites = fmt.one_adapter_per_site(gm, "adaption prompt")
    paths = {site.path for site in sites}
    if paths != {s.path for s in candidates[-len(paths):]}:
        layers = sorted(s.layer[1] if s.layer else s.path for s in sites)
        raise GraftrError(f"{where}: PEFT's AdaptionPrompt prompts the last adapter_layers attention blocks; this "
                          f"adapter prompts layers {layers} of {len(candidates)}")
    _ap_check_blocks(sites, where)
    state = fmt.real_state(gm)
    keys = fmt.peft_keys(gm, rename=_AP_NAMES)
    prompts = {f"{t}.prompt" for t in gm.adapter_modules()}
    tensors = {keys[n]: t[None] if n in prompts else t for n, t in state.items()}
    config = {
        "adapter_layers": len(paths), "adapter_len": lengths[0], "auto_mapping": None,
        "base_model_name_or_path": gm.model_id, "inference_mode": True, "peft_type": "ADAPTION_PROMPT",
        "revision": None, "target_modules": _AP_TARGET, "task_type": "CAUSAL_LM",
    }
    return config, tensors
