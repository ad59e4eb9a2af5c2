"""Trace a Hugging Face model into a torch.fx GraphModule with ``torch.export`` (non-strict).

The graph keeps the HF parameter names (``model.layers.0.self_attn.q_proj.weight``), has dynamic batch and
sequence dimensions bounded by the model's maximum positions, and works on the ``meta`` device, where tracing a
7B structure takes seconds and no weight memory.

Export bakes the module mode into the graph (``aten.dropout(x, p, True)``, SDPA's ``dropout_p``), and an
exported module refuses ``.train()``/``.eval()``. :class:`NormalizeModes` therefore traces in training mode and turns
every dropout into an ``nn.Dropout`` submodule and every SDPA call into an :class:`SDPA` submodule, so the mode
switches exactly as on the HF model. It also routes a ``position_ids`` input through :class:`SharedRows`, so
default positions (one row broadcast over the batch) give rotary tables of one row, as in the HF forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

from graftr import fxmeta
from graftr.errors import GraftrError
from graftr.passbase import GraphPass, PassResult, run_passes

# Bounds of the dynamic dimensions. Tracing examples avoid 0 and 1, which export would specialise on.
MAX_BATCH = 4096
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8
_DEFAULT_MAX_POSITIONS = 4096  # models with relative positions (T5) have no bound of their own
_RELATIVE_POSITIONS = ("t5", "mt5", "umt5", "longt5")  # their n_positions is a convention, not a limit
# Decoder-only families traced with ``position_ids`` as a graph input (so generation can give each step its own
# positions), and how their HF forward fills them when none are given, which the grafted wrapper reproduces:
# "arange" is ``0..T-1`` in every row, "mask" is OPT's ``cumsum(attention_mask) * attention_mask - 1``.
POSITION_DEFAULTS = {"llama": "arange", "mistral": "arange", "qwen2": "arange", "qwen3": "arange", "gemma2": "arange",
                     "phi3": "arange", "gpt2": "arange", "gpt_neox": "arange", "opt": "mask"}


class SDPA(nn.Module):
    """``F.scaled_dot_product_attention`` with its dropout following ``self.training``, as in the HF module.

    A boolean mask that allows everything, or exactly the causal triangle, is dropped for ``attn_mask=None`` (with
    ``is_causal`` for the triangle), as HF's eager masking does for an unpadded batch: the traced graph always builds
    the mask (the check depends on data), but SDPA then runs its mask-free kernels and keeps no mask for backward.
    The check costs O(B·T²) comparisons, once per forward for all the layers sharing one mask tensor; it is skipped
    under ``torch.compile``, which would break the graph on it.
    """

    def __init__(self, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False):
        super().__init__()
        self.dropout_p, self.is_causal, self.scale, self.enable_gqa = dropout_p, is_causal, scale, enable_gqa

    def forward(self, q, k, v, attn_mask=None):
        is_causal = self.is_causal
        if attn_mask is not None and not is_causal and attn_mask.device.type != "meta" \
                and not torch.compiler.is_compiling():
            form = _mask_form(attn_mask, q.shape[-2], k.shape[-2])
            if form is not None:
                attn_mask, is_causal = None, form == "causal"
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale, enable_gqa=self.enable_gqa)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, is_causal={self.is_causal}, scale={self.scale}"


_last_mask: tuple[weakref.ref, tuple, str | None] | None = None  # the mask tensor checked last, and its form


def _mask_form(mask: torch.Tensor, queries: int, keys: int) -> str | None:
    """``"full"`` if the boolean ``mask`` allows every key, ``"causal"`` if exactly ``key <= query`` (square), else
    None. Remembers the last tensor checked: the layers of one forward share their mask tensor."""
    global _last_mask
    if mask.dtype != torch.bool:
        return None
    key = (mask.shape, mask.stride(), mask._version, queries, keys)
    if _last_mask is not None and _last_mask[0]() is mask and _last_mask[1] == key:
        return _last_mask[2]
    form = None
    if bool(mask.all()):
        form = "full"
    elif queries == keys and mask.shape[-2:] == (queries, keys):
        causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
        form = "causal" if bool((mask == causal).all()) else None
    _last_mask = (weakref.ref(mask), key, form)
    return form


@dataclass
class TraceSpec:
    """What the graph takes: tensor input names, which of them share the batch and which the decoder sequence dim."""

    input_names: list[str]
    max_positions: int
    decoder_inputs: list[str] = field(default_factory=list)
    position_ids: str | None = None  # how the model fills position_ids (a POSITION_DEFAULTS value) when traced


def max_positions(config) -> int:
    """The longest sequence the model's position embeddings allow (RoBERTa-style offsets included)."""
    if getattr(config, "model_type", "") in _RELATIVE_POSITIONS:
        return _DEFAULT_MAX_POSITIONS
    n = None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            break
    if not isinstance(n, int) or n <= 0:
        return _DEFAULT_MAX_POSITIONS
    pad = getattr(config, "pad_token_id", None)
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") and isinstance(pad, int):
        n -= pad + 1  # positions start at padding_idx + 1
    return n


def trace_spec(model: nn.Module) -> TraceSpec:
    """Choose the tensor inputs to trace with from the model's forward signature and config."""
    params = inspect.signature(model.forward).parameters
    config = model.config
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        names.append("token_type_ids")
    decoder = []
    if getattr(config, "is_encoder_decoder", False):
        decoder = ["decoder_input_ids", "decoder_attention_mask"]
    missing = [n for n in names + decoder if n not in params]
    if missing:
        raise GraftrError(f"{type(model).__name__}.forward does not take {missing}; graftr traces text models")
    positions = POSITION_DEFAULTS.get(getattr(config, "model_type", ""))
    if positions is not None and not decoder and "position_ids" in params:
        names.append("position_ids")
    else:
        positions = None
    return TraceSpec(names + decoder, max_positions(config), decoder, positions)


def default_position_ids(kind: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``position_ids`` the HF forward computes when given none (``kind`` from :data:`POSITION_DEFAULTS`)."""
    if kind == "mask":
        return attention_mask.long().cumsum(1) * attention_mask - 1
    batch, seq = attention_mask.shape
    return torch.arange(seq, device=attention_mask.device).expand(batch, seq)


_REUSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("graftr_reused_traces", default=None)


@contextlib.contextmanager
def reuse_traces():
    """Within the block, :func:`export` of a model exported before in the block returns that export instead of
    tracing again: "the same model" is either a model on the ``meta`` device equal to the earlier one (class,
    config, every tensor's name, shape and dtype, the tracing options), or the very same model object still holding
    the very same tensors (``requires_grad``, which grafting sets, does not change the trace).

    ``graftr train`` builds its model on ``meta`` twice, for the memory estimate and to load the weights into, and
    the trace is most of the start-up (SmolLM2: ~14 s a trace on one core). Each :func:`to_graph_module` of the
    program is a graph of its own (``ExportedProgram.module()`` copies the graph); they share the model's tensors,
    as a graph traced from a model always does (meta ones hold no data)."""
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


def _reuse_key(model: nn.Module, spec: TraceSpec, dynamic: bool):
    """What makes two models trace alike here, or None (a config that does not serialize)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    try:
        config = model.config.to_json_string(use_diff=False)
    except (AttributeError, TypeError, ValueError):  # a config that does not serialize: no reuse
        return None
    if all(t.device.type == "meta" for _, t in tensors):
        return (type(model), config, repr(spec), dynamic,
                tuple((name, tuple(t.shape), t.dtype) for name, t in tensors))
    # tensors with data are never shared between two models: only this model, with these tensors
    return (id(model), type(model), config, repr(spec), dynamic,
            tuple((name, id(t), tuple(t.shape), t.dtype) for name, t in tensors))


def export(model: nn.Module, spec: TraceSpec | None = None, *, dynamic: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` the model (non-strict) in training mode with dynamic batch and sequence dims (inside
    :func:`reuse_traces`, the same model exported before in the block is not traced again).

    ``dynamic=False`` traces the example shapes only, in half the time: for a plan that is never run (``graftr
    apply`` on the ``meta`` device), where the graph's ops, parameters and sites are the same.
    """
    spec = spec or trace_spec(model)
    reused = _REUSED.get()
    key = _reuse_key(model, spec, dynamic) if reused is not None else None
    if key is not None and key in reused:
        return reused[key][0]
    program = _export(model, spec, dynamic)
    if key is not None:
        reused[key] = (program, model)  # the model held: its id is not reused while the block runs
    return program


def _export(model: nn.Module, spec: TraceSpec, dynamic: bool) -> torch.export.ExportedProgram:
    device = next(model.parameters()).device
    seq_max = max(spec.max_positions, _EXAMPLE_SEQ + 1)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=seq_max)
    dec_seq = Dim("decoder_seq", min=1, max=seq_max)
    kwargs, dims = {}, {}
    vocab = max(2, int(getattr(model.config, "vocab_size", 2) or 2))
    for name in spec.input_names:
        if name.endswith("input_ids"):
            t = torch.randint(0, min(vocab, 100), (_EXAMPLE_BATCH, _EXAMPLE_SEQ), device=device)
        elif name == "token_type_ids":
            t = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.long, device=device)
        elif name == "position_ids":
            t = torch.arange(_EXAMPLE_SEQ, device=device).repeat(_EXAMPLE_BATCH, 1)
        else:
            t = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.long, device=device)
        kwargs[name] = t
        dims[name] = {0: batch, 1: dec_seq if name in spec.decoder_inputs else seq}
    was_training = model.training
    # No KV-cache objects in the graph. Submodules may hold their own config copy (T5's decoder stack does).
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    had_cache = {key: c.use_cache for key, c in configs.items()}
    model.train()  # dropout nodes must exist in the graph; NormalizeModes makes them follow the mode
    for c in configs.values():
        c.use_cache = False
    # DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear process-wide once an engine exists (and says it never
    # restores it); traced through that wrapper a linear is no aten.linear node, so no site. Trace the real op.
    patched_linear, torch.nn.functional.linear = torch.nn.functional.linear, torch._C._nn.linear
    try:
        with torch.no_grad():
            return torch.export.export(model, (), kwargs, dynamic_shapes=dims if dynamic else None, strict=False)
    except Exception as e:  # torch raises many types here; the user needs the model name and the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraftrError(f"torch.export could not trace {type(model).__name__}: {first}") from e
    finally:
        torch.nn.functional.linear = patched_linear
        model.train(was_training)
        for key, c in configs.items():
            c.use_cache = had_cache[key]


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> str:
    """Install ``module`` at ``path`` (creating empty parent containers) and return the target used."""
    parent = gm
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    name, i = parts[-1], 0
    while hasattr(parent, name):
        i += 1
        name = f"{parts[-1]}_{i}"
    parent.add_module(name, module)
    return ".".join(parts[:-1] + [name])


def install_module(gm: fx.GraphModule, path: str, module: nn.Module) -> str:
    return _install(gm, path, module)


def add_graph_input(gm, name: str) -> fx.Node:
    """A new keyword input ``name`` of ``gm``'s graph, after the others (the image of image-conditioned prompts, the
    adapter index of a bank): its placeholder, the graph's call spec and ``gm.graftr_input_names``."""
    from torch.utils._pytree import tree_structure

    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(name)
    names = [*gm.graftr_input_names, name]
    spec = tree_structure(((), {n: 0 for n in names}))
    graph._codegen.pytree_info = graph._codegen.pytree_info._replace(orig_args=names, in_spec=spec)
    gm._in_spec = spec
    gm.graftr_input_names = names
    return node


class NormalizeModes(GraphPass):
    """Make baked-in mode-dependent ops follow ``.train()``/``.eval()``: dropout → ``nn.Dropout``, SDPA → :class:`SDPA`
    (grouped-query SDPA reads the key/value heads without HF's ``repeat_kv`` copies)."""

    name = "normalize_modes"

    def call(self, gm: fx.GraphModule) -> PassResult:
        _normalize(gm)
        return PassResult(gm, True)


def _normalize(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        owner = fxmeta.module_path(node) or ""
        replaced = []
        if node.target in (torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default):
            x, p, train = (list(node.args) + [None, None])[:3]
            if not train or not p:
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                continue
            cls = nn.Dropout if node.target == torch.ops.aten.dropout.default else nn.Dropout1d
            inner = fxmeta.innermost(node)
            path = owner if inner and inner[1] == "Dropout" else f"{owner}.dropout" if owner else "dropout"
            target = _install(gm, path, cls(float(p)))
            with graph.inserting_before(node):
                new = graph.call_module(target, (x,))
        elif node.target == torch.ops.aten.histc.default:  # MoE routing counts: the input dtype follows the device
            from graftr.moe import expert_histc

            source = node.args[0]
            if isinstance(source, fx.Node) and source.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default):
                source = source.args[0]
            with graph.inserting_before(node):
                new = graph.call_function(expert_histc, (source, *node.args[1:]), dict(node.kwargs))
        elif node.target == torch.ops.aten.scaled_dot_product_attention.default:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            bound = dict(zip(names, node.args))
            bound.update(node.kwargs)
            key, value, gqa = bound["key"], bound["value"], bool(bound.get("enable_gqa", False))
            grouped = [_repeated_kv(key), _repeated_kv(value)]
            if not gqa and None not in grouped and grouped[0][1] == grouped[1][1]:
                # SDPA groups the heads itself: the H-head copies of the keys and values are never made (nor saved
                # for backward), as in HF's eager path, which passes enable_gqa when it can
                replaced = [key, value]
                (key, _), (value, _) = grouped
                gqa = True
            module = SDPA(float(bound.get("dropout_p") or 0.0), bool(bound.get("is_causal", False)),
                          bound.get("scale"), gqa)
            target = _install(gm, f"{owner}.sdpa" if owner else "sdpa", module)
            with graph.inserting_before(node):
                new = graph.call_module(target, (bound["query"], key, value, bound.get("attn_mask")))
        else:
            continue
        fxmeta.copy_meta(node, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for dead in replaced:  # the repeat_kv copies SDPA no longer reads
            _erase_unused(graph, dead)


class SharedRows(nn.Module):
    """Row 0 of a tensor whose rows are one row repeated by construction (batch stride 0), else the tensor.

    The grafted wrapper's default ``position_ids`` is ``arange(T).expand(B, T)``: with this module after that
    input, the rotary tables (or position embeddings) are computed and kept for backward once, not once per row,
    as in the HF forward, which builds them from a ``(1, T)`` position tensor. Only inserted where every op between
    the input and the batch-carrying activations broadcasts (:class:`SharePositionRows`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 0 and x.shape[0] > 1 and x.stride(0) == 0:
            return x[:1]
        return x


# Ops that keep a position-only tensor's batch dim as a broadcastable leading dim (the rotary/position-embedding
# cone): elementwise ops, unsqueeze at dim ≥ 1, dtype casts, and cat along a non-batch dim (checked below).
_BROADCAST_OPS = {
    torch.ops.aten.unsqueeze.default, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype_layout, torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
    torch.ops.aten.div.Tensor, torch.ops.aten.mul.Scalar, torch.ops.aten.add.Scalar, torch.ops.aten.cos.default,
    torch.ops.aten.sin.default, torch.ops.aten.cat.default, torch.ops.aten.embedding.default,
    torch.ops.aten.type_as.default, torch.ops.aten.neg.default,
}
# Where a position-only tensor may meet the batch (B, ...) activations: broadcasting elementwise ops.
_MEETING_OPS = {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}


class SharePositionRows(GraphPass):
    """Route the ``position_ids`` input through :class:`SharedRows` when that is provably the same computation."""

    name = "share_position_rows"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, _share_position_rows(gm))


def _share_position_rows(gm: fx.GraphModule) -> bool:
    """:class:`SharePositionRows`' test and rewrite.

    Every node depending on ``position_ids`` alone must be a broadcasting op that leaves dim 0 alone (unsqueeze and
    cat at dims ≥ 1 of tensors with the batch first), and every node where such a tensor meets other inputs must be
    a broadcasting elementwise op, so a 1-row positions tensor gives each row the values all rows would have had.
    Returns whether the graph was changed.
    """
    graph = gm.graph
    pos = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "position_ids"), None)
    if pos is None:
        return False
    inputs = {n for n in graph.nodes if n.op == "placeholder"} - {pos}
    tainted: set[fx.Node] = set()  # depends on another input (batch-carrying)
    only: set[fx.Node] = {pos}  # depends on position_ids and constants only
    for node in graph.nodes:
        if node in inputs:
            tainted.add(node)
            continue
        ins = node.all_input_nodes
        from_pos = [a for a in ins if a in only]
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default \
                and "size" not in node.kwargs and len(node.args) <= 1:
            continue  # checks dtype/device/layout only
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input-shape guard: still given the full-batch input
        if any(a in tainted for a in ins):
            tainted.add(node)
            if from_pos and not (node.op == "call_function" and node.target in _MEETING_OPS):
                return False
            continue
        if not from_pos:
            continue
        if node.op != "call_function" or node.target not in _BROADCAST_OPS:
            return False
        if node.target == torch.ops.aten.unsqueeze.default and node.args[1] == 0:
            return False
        if node.target == torch.ops.aten.cat.default:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            rank = len(fxmeta.shape(node) or ())
            if not rank or dim % rank == 0:
                return False
        if node.target == torch.ops.aten.embedding.default and node.args[0] in only:
            return False  # the positions must be the indices, not the table
        only.add(node)
    users = [u for u in pos.users if not (u.op == "call_module" and u.target == "_guards_fn")]
    if not users:
        return False
    target = _install(gm, "position_rows", SharedRows())
    with graph.inserting_after(pos):
        shared = graph.call_module(target, (pos,))
    fxmeta.copy_meta(pos, shared)
    for u in users:
        u.replace_input_with(pos, shared)
    return True


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _repeated_kv(node) -> tuple[fx.Node, int] | None:
    """``(x, n)`` when ``node`` is HF's ``repeat_kv(x, n)``, n > 1: ``x[:, :, None].expand(B, Hkv, n, T, d)
    .reshape(B, Hkv·n, T, d)``, which puts query head h on key/value head h // n, SDPA's ``enable_gqa`` grouping."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == torch.ops.aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target == torch.ops.aten.unsqueeze.default
            and unsqueeze.args[1] == 2):
        return None
    x = unsqueeze.args[0]
    xs, ys = fxmeta.shape(x), fxmeta.shape(node)
    if not xs or not ys or len(xs) != 4 or len(ys) != 4:
        return None
    try:
        kv_heads, heads = int(xs[1]), int(ys[1])
        n = int(expand.args[1][2])
    except (TypeError, ValueError):  # symbolic head counts: leave the graph alone
        return None
    if n <= 1 or heads != kv_heads * n:
        return None
    return x, n


def _erase_unused(graph: fx.Graph, node) -> None:
    """Erase ``node`` and then its inputs while nothing else uses them (a chain made dead by a rewrite)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and not node.users:
        parent = node.args[0] if node.args else None
        graph.erase_node(node)
        node = parent


def to_graph_module(ep: torch.export.ExportedProgram, cls: type[fx.GraphModule] = fx.GraphModule,
                    class_name: str = "GraphModule") -> fx.GraphModule:
    """A plain (train/eval-able) GraphModule from an exported program, HF parameter names kept."""
    unlifted = ep.module()
    gm = cls(unlifted, unlifted.graph, class_name=class_name)
    # unlifting registers every buffer as persistent; HF's non-persistent ones (rotary inv_freq, BERT's position_ids,
    # Gemma's embed_scale) must stay out of the state dict, so an HF state dict loads strictly, unchanged
    for spec in ep.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.BUFFER and not spec.persistent:
            owner, _, name = spec.target.rpartition(".")
            gm.get_submodule(owner)._non_persistent_buffers_set.add(name)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, attr):
            setattr(gm, attr, getattr(unlifted, attr))
    return run_passes(gm, NormalizeModes(), SharePositionRows()).graph_module
