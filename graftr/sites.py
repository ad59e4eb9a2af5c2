"""Sites: the places in a traced graph an adapter can attach to.

A *linear site* is a module whose own graph nodes apply one weight matrix (``nn.Linear`` → ``aten.linear``,
GPT-2's ``Conv1D`` → ``view/addmm/view``), seen from outside as one input node and one output node.
An *attention site* is an attention computation with its query (after RoPE), key, value and mask, the block's
projections and its head geometry: an ``SDPA`` call (after :class:`graftr.trace.NormalizeModes`), or the eager pattern
``matmul(q, kᵀ) → scale → (softcap) → (+ mask/bias) → softmax → (dropout) → matmul(·, v)`` of models traced with
eager attention (Gemma-2, with its score softcapping; any model built with ``attn_implementation="eager"``).

An *expert site* is one fused expert projection of a Mixture-of-Experts layer (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``): a grouped product of the routed rows (sorted by expert) with a 3-D weight, the
offsets that split the rows among the experts, and the bias gpt-oss adds (:mod:`graftr.moe`). A router (a module
whose one linear feeds its top-k, so the module has several outputs) is a linear site whose output is that linear.

Sites are found from the graph alone: ``nn_module_stack`` (read through :mod:`graftr.fxmeta`) tells which module
each node belongs to, so no model code is re-implemented here.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.nn.modules.dropout import _DropoutNd

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
    quant: str | None = None  # "nf4" / "fp4" / "int8" once the quantize pass stored the weight packed
    role: str | None = None  # "router" for a Mixture-of-Experts router

    @property
    def anchor(self) -> fx.Node:
        return self.nodes[-1]

    def adapter_path(self, name: str) -> str:
        """Where a rule's adapter module for this site is installed."""
        return f"{self.path}.{name}"


@dataclass(eq=False)
class ExpertSite:
    """One fused expert projection: ``y[s] = x[s] @ W[e(s)]ᵀ (+ b[e(s)])`` for the routed rows ``s`` (sorted by
    expert; ``offsets`` (E,) the cumulative row counts), ``W`` the 3-D parameter ``weight`` — (E, out, in) for
    ``layout="out_in"`` (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3), (E, in, out) for ``"in_out"`` (gpt-oss).

    ``path`` is the parameter's name (``model.layers.0.mlp.experts.down_proj``), as PEFT's ``target_parameters``
    names it; a parameter is not a module, so the adapters sit beside it at ``<path>_<rule>``. ``fused`` says how a
    gate/up projection holds its two halves (``"concatenated"``: gate rows [0, I), up [I, 2I); ``"interleaved"``:
    gpt-oss's even/odd columns), else None."""

    path: str
    module_class: str
    weight: str
    bias: str | None
    layout: str
    num_experts: int
    in_features: int
    out_features: int
    input: fx.Node  # (S, in), rows sorted by expert
    output: fx.Node  # (S, out)
    offsets: fx.Node  # (E,) int
    nodes: list[fx.Node]  # the product (and its bias add)
    op: str = "experts"
    layer: tuple[str, int] | None = None
    adapters: list[str] = field(default_factory=list)
    fused: str | None = None
    quant: str | None = None

    @property
    def anchor(self) -> fx.Node:
        return self.nodes[0]

    @property
    def role(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def adapter_path(self, name: str) -> str:
        return f"{self.path}_{name}"


@dataclass(frozen=True)
class Rows:
    """The output features of a projection that belong to one role (q, k or v).

    Features ``g * stride + r`` for every group ``g < groups`` and ``start <= r < stop``, in that order. A plain
    projection is one group of all its features; GPT-2's ``c_attn`` ([q|k|v] on the last dim) gives the key
    ``Rows(1, 3D, D, 2D)``; GPT-NeoX's ``query_key_value`` (per head [q,k,v], viewed as (..., H, 3·hd) and chunked)
    gives the key ``Rows(H, 3·hd, hd, 2·hd)``.
    """

    groups: int
    stride: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.groups * (self.stop - self.start)

    def take(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The role's part of ``t`` along ``dim`` (the projection's output-feature axis of a weight, bias or output)."""
        if self.groups == 1 and self.start == 0 and self.stop == self.stride == t.shape[dim]:
            return t
        dim = dim % t.dim()
        grouped = t.unflatten(dim, (self.groups, self.stride)).narrow(dim + 1, self.start, self.stop - self.start)
        return grouped.flatten(dim, dim + 1)


@dataclass(eq=False)
class AttentionSite:
    """One attention computation, found either as an ``SDPA`` call (``form="sdpa"``) or as the eager pattern
    ``matmul(q, kᵀ) → scale → (softcap) → (+ mask/bias) → softmax → (dropout) → matmul(·, v)`` (``form="eager"``).

    ``query``/``key``/``value`` are the tensors the scores are computed from, (B, heads, T|S, hd), with positions
    already applied (RoPE); the key and value may already be repeated to H heads (HF's ``repeat_kv``).
    ``scale`` multiplies ``query · keyᵀ`` (1/√hd, Gemma-2's ``query_pre_attn_scalar**-0.5``, 1.0 for T5 and for
    OPT, whose query is pre-scaled). ``output`` is the current (B, H, T, hd) attention output, before heads are
    merged and ``o_proj`` applied. ``projections[role]`` and ``rows[role]`` give the linear site and output
    features producing the query, key and value (for a fused projection ``projections["qkv"]``), see
    :meth:`projection`.
    """

    path: str
    module_class: str
    node: fx.Node  # the attention op: the SDPA call_module, or the eager pattern's second matmul
    query: fx.Node  # (B, H, T, hd), positions already applied
    key: fx.Node  # (B, H or Hkv, S, hd)
    value: fx.Node
    mask: fx.Node | None  # SDPA's attn_mask; eager: the one term added to the scores (None if none or several)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    projections: dict[str, LinearSite]  # "q", "k", "v", "o" (or "qkv" for fused) → site, when found
    op: str = "attention"
    layer: tuple[str, int] | None = None
    output: fx.Node | None = None
    adapters: list[str] = field(default_factory=list)
    form: str = "sdpa"  # "sdpa" or "eager"
    scores: fx.Node | None = None  # eager: what softmax reads (scaled, capped, masked scores), (B, H, T, S)
    softcap: float | None = None  # eager: scores = softcap · tanh(scores / softcap) before the mask (Gemma-2)
    rows: dict[str, Rows] = field(default_factory=dict)  # "q", "k", "v" → output features of their projection

    @property
    def anchor(self) -> fx.Node:
        return self.node

    def __post_init__(self):
        if self.output is None:
            self.output = self.node

    def adapter_path(self, name: str) -> str:
        return f"{self.path}.{name}"

    def projection(self, role: str) -> tuple[LinearSite, Rows] | None:
        """The linear site computing ``role`` ("q", "k" or "v") and which of its output features, if found."""
        if role not in self.rows:
            return None
        return self.projections.get(role) or self.projections["qkv"], self.rows[role]


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
    from graftr import quantize

    by_path = _nodes_by_module(gm.graph)
    sites = []
    for path, nodes in by_path.items():
        ops = [n for n in nodes if n.op == "call_function" and (n.target in _LINEAR_OPS or n.target in quantize.OPS)]
        if len(ops) != 1:
            continue
        op = ops[0]
        if op.target in quantize.OPS:  # a site the quantize pass stored packed: x, weight, stats, bias, ...
            bounds = _boundary(nodes)
            if bounds is None:
                continue
            out_f, in_f = quantize.site_shape(gm, op)
            b = op.args[3]
            sites.append(LinearSite(path, fxmeta.innermost(op)[1], op.args[1].target,
                                    b.target if isinstance(b, fx.Node) else None, "out_in", in_f, out_f, bounds[0],
                                    bounds[1], nodes, layer=layer_of(path),
                                    quant=gm.graftr_quantized[path].method))
            continue
        layout = _LINEAR_OPS[op.target]
        if layout == "out_in":
            w, b = op.args[1], (op.args[2] if len(op.args) > 2 else None)
        else:  # addmm(bias, x, weight)
            b, w = op.args[0], op.args[2]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        bounds = _boundary(nodes)
        role = None
        if bounds is None and "router" in (fxmeta.innermost(op) or ("", ""))[1].lower():
            bounds, nodes, role = (op.args[0], op), [op], "router"  # its linear feeds its top-k: several outputs
        if bounds is None:
            continue
        weight = gm.get_parameter(w.target) if _is_param(gm, w.target) else None
        if weight is None or weight.dim() != 2:
            continue
        out_f, in_f = weight.shape if layout == "out_in" else weight.shape[::-1]
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        cls = fxmeta.innermost(op)[1]
        sites.append(LinearSite(path, cls, w.target, bias, layout, int(in_f), int(out_f), bounds[0], bounds[1],
                                nodes, layer=layer_of(path), role=role))
    return sites


def _expert_weight(gm: fx.GraphModule, w) -> tuple[str, str] | None:
    """The 3-D parameter an expert product multiplies by, and its layout: read as is ("in_out") or through
    ``transpose(-2, -1)`` ("out_in")."""
    layout = "in_out"
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target == torch.ops.aten.transpose.int \
            and {a % 3 for a in w.args[1:3]} == {1, 2}:
        w, layout = w.args[0], "out_in"
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and _is_param(gm, w.target)):
        return None
    return (w.target, layout) if gm.get_parameter(w.target).dim() == 3 else None


def _expert_bias(gm: fx.GraphModule, op: fx.Node) -> tuple[fx.Node, str] | None:
    """gpt-oss's ``out.add_(bias[expert_ids])`` right after the product: (the add, the bias parameter)."""
    users = [u for u in op.users if u.target != _ASSERT]
    if len(users) != 1 or users[0].target not in (torch.ops.aten.add_.Tensor, torch.ops.aten.add.Tensor):
        return None
    add = users[0]
    other = add.args[1] if add.args[0] is op else add.args[0]
    if isinstance(other, fx.Node) and other.target == torch.ops.aten.index.Tensor:
        table = other.args[0]
        if isinstance(table, fx.Node) and table.op == "get_attr" and _is_param(gm, table.target):
            return add, table.target
    return None


def _fused_form(output: fx.Node) -> str | None:
    for user in output.users:
        if user.target == torch.ops.aten.chunk.default:
            return "concatenated"
        if user.target == torch.ops.aten.slice.Tensor and len(user.args) > 4 and user.args[4] == 2:
            return "interleaved"
    return None


def find_expert_sites(gm: fx.GraphModule) -> list[ExpertSite]:
    from graftr.moe import grouped_ops

    ops = grouped_ops()
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        found = _expert_weight(gm, node.args[1])
        if found is None:
            continue
        weight, layout = found
        shape = gm.get_parameter(weight).shape
        num, in_f, out_f = (shape[0], shape[2], shape[1]) if layout == "out_in" else tuple(shape)
        bias = _expert_bias(gm, node)
        output, nodes = (bias[0], [node, bias[0]]) if bias else (node, [node])
        inner = fxmeta.innermost(node)
        sites.append(ExpertSite(weight, inner[1] if inner else "", weight, bias[1] if bias else None, layout,
                                int(num), int(in_f), int(out_f), node.args[0], output, node.args[2], nodes,
                                layer=layer_of(weight), fused=_fused_form(output)))
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


# ---- how the query, key and value come out of their projections --------------------------------------------
_A = torch.ops.aten
_PASS_OPS = {_A.contiguous.default, _A.clone.default, _A.to.dtype, _A._to_copy.default, _A.alias.default}
_VIEW_OPS = {_A.view.default, _A.reshape.default, _A._unsafe_view.default}
_SPLIT_OPS = {_A.split.Tensor, _A.split_with_sizes.default, _A.chunk.default}


def _last_dim(node: fx.Node, dim) -> bool:
    shape = fxmeta.shape(node)
    return shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def _segments(node: fx.Node, rows: Rows) -> list[tuple[fx.Node, Rows]]:
    """Follow a projection's output through layout ops to where it is cut into q/k/v parts on the feature axis.

    At most one grouping view ((..., F) → (..., n, F/n)) followed by one cut (slice, split or chunk of the last
    dim); transposes that keep the last dim and dtype casts pass through. Returns each part with its features.
    """
    out = []
    whole = rows.start == 0 and rows.stop == rows.stride
    for user in node.users:
        t, args = user.target, user.args
        if user.op != "call_function":
            continue
        if t in _PASS_OPS:
            out += _segments(user, rows)
        elif t in _VIEW_OPS or t in (_A.transpose.int,):
            before, after = fxmeta.shape(node), fxmeta.shape(user)
            if before is None or after is None or isinstance(after[-1], torch.SymInt):
                continue
            width = rows.stop - rows.start
            if t == _A.transpose.int and not (_last_dim(node, args[1]) or _last_dim(node, args[2])):
                out += _segments(user, rows)
            elif t in _VIEW_OPS and int(after[-1]) == width:
                out += _segments(user, rows)
            elif t in _VIEW_OPS and whole and rows.groups == 1 and width % int(after[-1]) == 0:
                n = width // int(after[-1])
                out += _segments(user, Rows(n, width // n, 0, width // n))
        elif not whole:
            continue  # already cut: any further op (RoPE's halves, ...) is the part's own business
        elif t == _A.slice.Tensor and _last_dim(node, args[1]):
            begin, end = (list(args[2:4]) + [0, None])[:2]
            width = rows.stop - rows.start
            begin, end = max(0, begin or 0), min(width, width if end is None else end)
            out.append((user, Rows(rows.groups, rows.stride, rows.start + begin, rows.start + end)))
        elif t in _SPLIT_OPS and _last_dim(node, args[2] if len(args) > 2 else 0):
            width = rows.stop - rows.start
            if t == _A.chunk.default:
                size = -(-width // args[1])
                sizes = [min(size, width - i) for i in range(0, width, size)]
            elif t == _A.split.Tensor:
                sizes = [min(args[1], width - i) for i in range(0, width, args[1])]
            else:
                sizes = list(args[1])
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            for item in user.users:
                if item.target is operator.getitem:
                    i = item.args[1]
                    out.append((item, Rows(rows.groups, rows.stride, rows.start + offsets[i],
                                           rows.start + offsets[i] + sizes[i])))
    return out


def _reaches(start: fx.Node, goal: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``goal`` depends on ``start`` (only nodes between the two in graph order are visited)."""
    limit, seen, todo = order[goal], {start}, [start]
    while todo:
        node = todo.pop()
        if node is goal:
            return True
        for user in node.users:
            if user not in seen and order.get(user, limit + 1) <= limit:
                seen.add(user)
                todo.append(user)
    return False


def _roles(projections: dict[str, LinearSite], goals: dict[str, fx.Node],
           order: dict[fx.Node, int]) -> dict[str, Rows]:
    """Which output features of which projection feed the query, key and value (checked on the graph)."""
    rows: dict[str, Rows] = {}
    for role, goal in goals.items():
        site = projections.get(role)
        if site is not None and _reaches(site.output, goal, order):
            rows[role] = Rows(1, site.out_features, 0, site.out_features)
    fused = projections.get("qkv")
    if fused is not None and len(rows) < len(goals):
        for part, part_rows in _segments(fused.output, Rows(1, fused.out_features, 0, fused.out_features)):
            reached = [role for role, goal in goals.items() if _reaches(part, goal, order)]
            if len(reached) == 1 and reached[0] not in rows:
                rows[reached[0]] = part_rows
    return rows


# ---- the eager pattern -------------------------------------------------------------------------------------
_MATMULS = {_A.matmul.default, _A.bmm.default}
SOFTMAX_OPS = {_A.softmax.int, _A._softmax.default, _A._safe_softmax.default}
_CASTS = {_A.to.dtype, _A._to_copy.default, _A.clone.default, _A.contiguous.default, _A.type_as.default}
_ASSERT = _A._assert_tensor_metadata.default


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if u.target != _ASSERT]
    return users[0] if len(users) == 1 else None


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _eager_scores(first: fx.Node):
    """From ``matmul(q, kᵀ)`` forward to the softmax: (softmax node, scale, softcap, additive terms) or None."""
    scale, softcap, terms, node = 1.0, None, [], first
    while True:
        user = _only_user(node)
        if user is None or user.op != "call_function":
            return None
        t, args = user.target, user.args
        if t in SOFTMAX_OPS:
            return (user, scale, softcap, terms) if args[0] is node and _last_dim(node, args[1]) else None
        other = [a for a in args[:2] if a is not node]
        if t in _CASTS:
            pass
        elif t in (_A.mul.Tensor, _A.div.Tensor) and len(other) == 1 and _is_scalar(other[0]):
            cap = _only_user(user)
            after = _only_user(cap) if cap is not None and cap.target == _A.tanh.default else None
            if (t == _A.div.Tensor and after is not None and after.target == _A.mul.Tensor
                    and other[0] in after.args):  # softcap · tanh(x / softcap)
                softcap, user = float(other[0]), after
            elif softcap is None:
                scale = scale * other[0] if t == _A.mul.Tensor else scale / other[0]
            else:
                return None
        elif t in (_A.add.Tensor, _A.masked_fill.Scalar, _A.masked_fill.Tensor) and len(other) == 1 \
                and isinstance(other[0], fx.Node):  # a mask or a position bias
            terms.append(other[0])
        else:
            return None
        node = user


def _eager_attention(gm: fx.GraphModule, first: fx.Node):
    """The eager pattern starting at ``first`` (a 4-D matmul), or None: (q, k, v, softmax node, scale, softcap,
    additive terms, output matmul)."""
    if len(first.args) != 2 or len(fxmeta.shape(first) or ()) != 4:
        return None
    q, kt = first.args
    if not (isinstance(kt, fx.Node) and kt.target == _A.transpose.int
            and {a % 4 for a in kt.args[1:3] if isinstance(a, int)} == {2, 3}):
        return None
    found = _eager_scores(first)
    if found is None:
        return None
    softmax, scale, softcap, terms = found
    node = softmax
    while (user := _only_user(node)) is not None:
        if user.op == "call_function" and user.target in _MATMULS:
            if user.args[0] is not node or len(fxmeta.shape(user) or ()) != 4:
                return None
            return q, kt.args[0], user.args[1], softmax, scale, softcap, terms, user
        dropout = user.op == "call_module" and isinstance(gm.get_submodule(user.target), _DropoutNd)
        if not (dropout or user.op == "call_function" and user.target in _CASTS):
            return None
        node = user
    return None


def find_attention_sites(gm: fx.GraphModule, linear_sites: list[LinearSite]) -> list[AttentionSite]:
    linear_by_path = {s.path: s for s in linear_sites}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = []
    for node in gm.graph.nodes:
        inner = fxmeta.innermost(node)
        if inner is None:
            continue
        extra = {}
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), SDPA):
            sdpa: SDPA = gm.get_submodule(node.target)
            q, k, v, mask = (list(node.args) + [None])[:4]
            scale = sdpa.scale
            anchor = node
        elif node.op == "call_function" and node.target in _MATMULS:
            found = _eager_attention(gm, node)
            if found is None:
                continue
            q, k, v, softmax, scale, softcap, terms, anchor = found
            mask = terms[0] if len(terms) == 1 else None
            inner = fxmeta.innermost(anchor)
            extra = dict(form="eager", scores=softmax.args[0], softcap=softcap)
        else:
            continue
        qs, ks = fxmeta.shape(q), fxmeta.shape(k)
        if not qs or not ks or len(qs) != 4 or len(ks) != 4:
            continue
        heads, head_dim = int(qs[1]), int(qs[3])
        projections = _projections(inner[0], linear_by_path)
        rows = _roles(projections, {"q": q, "k": k, "v": v}, order)
        kv_heads = rows["k"].size // head_dim if "k" in rows else int(ks[1])  # the key may be repeated to H heads
        scale = scale if scale is not None else head_dim ** -0.5
        sites.append(AttentionSite(inner[0], inner[1], anchor, q, k, v, mask, heads, kv_heads, head_dim, float(scale),
                                   projections, layer=layer_of(inner[0]), rows=rows, **extra))
    return sites


@dataclass
class SiteIndex:
    linear: list[LinearSite]
    attention: list[AttentionSite]
    stack_sizes: dict[str, int]
    experts: list[ExpertSite] = field(default_factory=list)

    def of_ops(self, ops) -> list:
        by_op = {"linear": self.linear, "attention": self.attention, "experts": self.experts}
        return [s for op in ops for s in by_op[op]]

    def all(self) -> list:
        return [*self.linear, *self.attention, *self.experts]


def find_sites(gm: fx.GraphModule) -> SiteIndex:
    linear = find_linear_sites(gm)
    return SiteIndex(linear, find_attention_sites(gm, linear), stack_sizes(n for n, _ in gm.named_parameters()),
                     find_expert_sites(gm))
