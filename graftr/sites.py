"""Sites: the places in a traced graph an adapter can attach to.

A *linear site* is a module whose own graph nodes apply one weight matrix (``nn.Linear`` → ``aten.linear``,
GPT-2's ``Conv1D`` → ``view/addmm/view``), seen from outside as one input node and one output node.
An *attention site* is an attention op (``SDPA`` after :func:`graftr.trace.normalize`) with its query, key, value
and mask inputs, the block's projections and its head geometry.

Sites are found from the graph alone: ``nn_module_stack`` (read through :mod:`graftr.fxmeta`) tells which module
each node belongs to, so no model code is re-implemented here.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from graftr import fxmeta
from graftr.trace import SDPA

_LINEAR_OPS = {torch.ops.aten.linear.default: "out_in", torch.ops.aten.addmm.default: "in_out"}
_NUMBER = re.compile(r"^\d+$")


def layer_of(path: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``model.layers.3.self_attn.k_proj``: the first numbered component."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if _NUMBER.match(p):
            return ".".join(parts[:i]), int(p)
    return None


def stack_sizes(names) -> dict[str, int]:
    """Number of layers in each stack, from parameter names (``{"model.layers": 32}``; T5 has two stacks)."""
    sizes: dict[str, int] = {}
    for name in names:
        layer = layer_of(name)
        if layer:
            sizes[layer[0]] = max(sizes.get(layer[0], 0), layer[1] + 1)
    return sizes


@dataclass(eq=False)
class LinearSite:
    path: str
    module_class: str
    weight: str  # parameter FQN of the weight
    bias: str | None
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)
    in_features: int
    out_features: int
    input: fx.Node  # the input the base op currently reads (input adapters replace it)
    output: fx.Node  # the site's current output (output adapters replace it)
    nodes: list[fx.Node]  # the module's own nodes
    op: str = "linear"
    layer: tuple[str, int] | None = None
    adapters: list[str] = field(default_factory=list)  # module targets grafted here, in order

    @property
    def anchor(self) -> fx.Node:
        return self.nodes[-1]


@dataclass(eq=False)
class AttentionSite:
    path: str
    module_class: str
    node: fx.Node  # the attention op (call_module SDPA)
    query: fx.Node  # (B, H, T, hd), positions already applied
    key: fx.Node  # (B, H or Hkv, S, hd)
    value: fx.Node
    mask: fx.Node | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    projections: dict[str, LinearSite]  # "q", "k", "v", "o" (or "qkv" for fused) → site, when found
    op: str = "attention"
    layer: tuple[str, int] | None = None
    output: fx.Node | None = None
    adapters: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> fx.Node:
        return self.node

    def __post_init__(self):
        if self.output is None:
            self.output = self.node


def _nodes_by_module(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    by_path: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        path = fxmeta.module_path(node)
        if path is not None and node.op in ("call_function", "call_module", "call_method"):
            by_path[path].append(node)
    return by_path


def _boundary(nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The single external tensor input and the single output of a module's nodes, or None if ambiguous."""
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes
              if a not in inside and a.op != "get_attr" and isinstance(fxmeta.val(a), torch.Tensor)}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    return inputs.pop(), outputs[0]


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    by_path = _nodes_by_module(gm.graph)
    sites = []
    for path, nodes in by_path.items():
        ops = [n for n in nodes if n.op == "call_function" and n.target in _LINEAR_OPS]
        if len(ops) != 1:
            continue
        op = ops[0]
        layout = _LINEAR_OPS[op.target]
        if layout == "out_in":
            w, b = op.args[1], (op.args[2] if len(op.args) > 2 else None)
        else:  # addmm(bias, x, weight)
            b, w = op.args[0], op.args[2]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        bounds = _boundary(nodes)
        if bounds is None:
            continue
        weight = gm.get_parameter(w.target) if _is_param(gm, w.target) else None
        if weight is None or weight.dim() != 2:
            continue
        out_f, in_f = weight.shape if layout == "out_in" else weight.shape[::-1]
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        cls = fxmeta.innermost(op)[1]
        sites.append(LinearSite(path, cls, w.target, bias, layout, int(in_f), int(out_f), bounds[0], bounds[1],
                                nodes, layer=layer_of(path)))
    return sites


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


_PROJ_NAMES = {
    "q": ("q_proj", "query", "q", "q_lin"),
    "k": ("k_proj", "key", "k", "k_lin"),
    "v": ("v_proj", "value", "v", "v_lin"),
    "o": ("o_proj", "dense", "o", "out_proj", "c_proj", "out_lin"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "Wqkv"),
}


def _projections(path: str, linear_by_path: dict[str, LinearSite]) -> dict[str, LinearSite]:
    """The block's q/k/v/o projections: linear sites named like HF's, inside the attention module or its parent."""
    found: dict[str, LinearSite] = {}
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    for role, names in _PROJ_NAMES.items():
        for base in (path, parent, f"{parent}.output"):
            hit = next((linear_by_path[f"{base}.{n}"] for n in names if f"{base}.{n}" in linear_by_path), None)
            if hit is not None:
                found[role] = hit
                break
    return found


def find_attention_sites(gm: fx.GraphModule, linear_sites: list[LinearSite]) -> list[AttentionSite]:
    linear_by_path = {s.path: s for s in linear_sites}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), SDPA):
            continue
        inner = fxmeta.innermost(node)
        if inner is None:
            continue
        sdpa: SDPA = gm.get_submodule(node.target)
        q, k, v, mask = (list(node.args) + [None])[:4]
        qs, ks = fxmeta.shape(q), fxmeta.shape(k)
        if not qs or not ks or len(qs) != 4:
            continue
        heads, head_dim = int(qs[1]), int(qs[3])
        projections = _projections(inner[0], linear_by_path)
        kv_heads = int(ks[1])
        if "k" in projections:  # the key may already be repeated to H heads (repeat_kv); the projection is not
            kv_heads = projections["k"].out_features // head_dim
        scale = sdpa.scale if sdpa.scale is not None else head_dim ** -0.5
        sites.append(AttentionSite(inner[0], inner[1], node, q, k, v, mask, heads, kv_heads, head_dim, float(scale),
                                   projections, layer=layer_of(inner[0])))
    return sites


@dataclass
class SiteIndex:
    linear: list[LinearSite]
    attention: list[AttentionSite]
    stack_sizes: dict[str, int]

    def of_ops(self, ops) -> list:
        return [s for op in ops for s in (self.linear if op == "linear" else self.attention)]

    def all(self) -> list:
        return [*self.linear, *self.attention]


def find_sites(gm: fx.GraphModule) -> SiteIndex:
    linear = find_linear_sites(gm)
    return SiteIndex(linear, find_attention_sites(gm, linear), stack_sizes(n for n, _ in gm.named_parameters()))
