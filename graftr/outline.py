"""Outline every transformer layer of a flat grafted graph into a submodule call at the layer's own path.

A traced model is one flat graph: its parameters are read with ``get_attr`` nodes of the root module. DeepSpeed
ZeRO-3 gathers a parameter when it is read inside the forward of the module that is running, and releases it after
that module's forward; in a flat graph that module is the root, so the whole model is gathered for the whole
forward. :func:`outline_layers` moves the nodes of each layer (``model.layers.3``, ``encoder.block.1``,
``transformer.h.0``, ``bert.encoder.layer.2``) into a ``GraphModule`` installed *at that path*, in place of the
parameter container that was there, with the same children. Parameter names do not change; the root graph calls
``call_module("model.layers.3", (inputs...))``, so ZeRO-3 fetches and releases one layer at a time.

Which node belongs to which layer
    ``get_attr`` and ``call_module`` nodes by their target, every other node by the module it was traced in
    (:func:`graftr.fxmeta.module_path`), both through :func:`graftr.sites.layer_of` restricted to the model's
    stacks (:func:`graftr.sites.stack_sizes`). Everything else (embeddings, masks, rotary tables, final norm,
    heads, size computations) stays in the root graph.
Values crossing a layer's boundary
    become the submodule's positional inputs (hidden states, ``cos``/``sin``, masks, the encoder output, SymInt
    sizes, which are plain ints when the graph runs) and the elements of the tuple it returns (hidden states, T5's
    position bias made by block 0 and reused by the other blocks), unpacked in the root with ``getitem``.
Shared modules outside every layer (rule-level modules such as a hypernetwork at ``model.layers.<rule>``)
    keep their nodes in the root graph: a ``get_attr``/``call_module`` whose target is not under the layer runs
    in the root and its result is passed into the layer. Layer-tagged nodes computed only from root values that
    feed such a node (e.g. ``E[l]`` selecting the hypernetwork's layer embedding) move to the root with it. A
    shared module applied to a value computed *inside* a layer cannot be outlined without splitting the layer in
    two; :func:`outline_layers` refuses it with a :class:`GraftrError` naming the node. Under ZeRO-3 shared
    parameters are gathered by the root for the whole forward, like the embeddings.

Why not ``torch.export.unflatten``
    It rebuilds the module hierarchy from an ``ExportedProgram`` (tried on the raw export of the tiny Llama,
    GPT-2, BERT and T5: it works there). But graftr edits the graph after export (dropout and attention turned into
    mode-following modules, adapters inserted, tags in ``node.meta``), so using it means exporting the grafted
    model a second time, which bakes the dropout mode back into the graph, then normalising every submodule again,
    replacing the ``InterpreterModule`` s (which run through ``fx.Interpreter``) and rebuilding the
    :class:`~graftr.grafted.GraftedModel` root; it is also reported to fail on some architectures
    (pytorch#160937). Outlining the graph we already have is one small pass with none of these steps.

Outline last: the model's ``site_index`` (and so :meth:`GraftedModel.merge_`) describes the flat graph. With
dropout active, the random stream is consumed in the same order as the flat graph (layers run where their first
computing node ran).
"""

from __future__ import annotations

import heapq
import operator

from torch import fx, nn

from graftr import fxmeta
from graftr.errors import GraftrError
from graftr.passbase import GraphPass, PassResult, run_passes
from graftr.sites import layer_of, stack_sizes

ROOT = ""  # group key of the nodes that stay in the root graph


def _layer_key(path: str | None, stacks: dict[str, int]) -> str:
    """``"model.layers.3"`` for a path inside layer 3 of a known stack, else :data:`ROOT`."""
    layer = layer_of(path) if path else None
    if layer is None or layer[0] not in stacks:
        return ROOT
    return f"{layer[0]}.{layer[1]}"


def _assign(graph: fx.Graph, stacks: dict[str, int]) -> dict[fx.Node, str]:
    """The layer (or :data:`ROOT`) every node runs in."""
    group: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            group[node] = _layer_key(node.target, stacks)
        elif node.op in ("call_function", "call_method"):
            group[node] = _layer_key(fxmeta.module_path(node), stacks)
        else:  # placeholder, output
            group[node] = ROOT
    # a layer's parameter read by nodes of other groups is read in the root and passed in
    for node in graph.nodes:
        if node.op == "get_attr" and group[node] != ROOT and any(group[u] != group[node] for u in node.users):
            group[node] = ROOT
    # layer-tagged nodes computed from root values only that feed a root node move to the root
    from_root = set()
    for node in graph.nodes:
        if (node.op in ("call_function", "call_method") and group[node] != ROOT
                and all(group[a] == ROOT or a in from_root for a in node.all_input_nodes)):
            from_root.add(node)
    for node in reversed(graph.nodes):
        if node in from_root and any(group[u] == ROOT for u in node.users):
            group[node] = ROOT
    return group


def _order(graph: fx.Graph, group: dict[fx.Node, str]) -> list:
    """Root nodes and layer keys in an executable order, each as close to its flat-graph position as possible.

    A layer runs at the position of its first computing node (``get_attr`` nodes all sit at the top of the graph).
    """
    index = {n: i for i, n in enumerate(graph.nodes)}
    members: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if group[node] != ROOT:
            members.setdefault(group[node], []).append(node)

    def item(node):
        return node if group[node] == ROOT else group[node]

    deps: dict[object, set] = {}
    position: dict[object, int] = {}
    for node in graph.nodes:
        key = item(node)
        deps.setdefault(key, set()).update(item(a) for a in node.all_input_nodes if item(a) != key)
    for node in graph.nodes:
        if group[node] == ROOT:
            position[node] = index[node]
    for key, nodes in members.items():
        computing = [index[n] for n in nodes if n.op != "get_attr"] or [index[n] for n in nodes]
        position[key] = min(computing)
    users: dict[object, set] = {k: set() for k in deps}
    for key, ds in deps.items():
        for d in ds:
            users[d].add(key)
    waiting = {k: len(ds) for k, ds in deps.items()}
    ready = [(position[k], i, k) for i, k in enumerate(deps) if not waiting[k]]
    heapq.heapify(ready)
    tiebreak = len(deps)
    order = []
    while ready:
        _, _, key = heapq.heappop(ready)
        order.append(key)
        for u in users[key]:
            waiting[u] -= 1
            if not waiting[u]:
                tiebreak += 1
                heapq.heappush(ready, (position[u], tiebreak, u))
    if len(order) != len(deps):
        stuck = [k for k in deps if waiting[k] and isinstance(k, fx.Node)]
        bad = next((n for n in stuck if n.op in ("call_module", "get_attr")), stuck[0] if stuck else None)
        layers = sorted(k for k in deps if waiting[k] and isinstance(k, str))
        what = f"{bad.op} {bad.target!r} (node {bad.name})" if bad is not None else "a root node"
        raise GraftrError(f"cannot outline {', '.join(layers)}: {what} runs outside the layer on values computed "
                          "inside it; a shared module must take inputs computed outside the layers")
    return order


def _layer_class(nodes: list[fx.Node], key: str) -> str:
    for node in nodes:
        for path, cls in fxmeta.module_stack(node):
            if path == key and cls:
                return cls
    return "Layer"


def _stack_meta(nodes: list[fx.Node], key: str) -> dict:
    """The ``nn_module_stack`` of a call to the layer: the entries down to the layer itself."""
    for node in nodes:
        stack = fxmeta.stack_down_to(node, key)
        if stack is not None:
            return stack
    return {}


def _build_layer(key: str, nodes: list[fx.Node], group: dict[fx.Node, str]):
    """The layer's own graph: its inputs (outer nodes), its nodes with relative targets, its outputs."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for a in node.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        fxmeta.copy_meta(a, env[a])
    prefix = key + "."
    for node in nodes:
        new = graph.node_copy(node, lambda a: env[a])
        if node.op in ("get_attr", "call_module"):
            new.target = node.target[len(prefix):]
        env[node] = new
    graph.output(tuple(env[o] for o in outputs))
    graph.lint()
    return graph, inputs, outputs


def _install_layer(gm: fx.GraphModule, key: str, graph: fx.Graph, class_name: str) -> None:
    """Replace the parameter container at ``key`` by a GraphModule running ``graph``, with the same children."""
    parent_path, _, name = key.rpartition(".")
    parent = gm.get_submodule(parent_path)
    old = parent.get_submodule(name)
    if isinstance(old, fx.GraphModule):
        raise GraftrError(f"{key} is already outlined")
    new = fx.GraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    for attr in ("_parameters", "_buffers", "_modules"):
        getattr(new, attr).update(getattr(old, attr))
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.train(old.training)
    new.graph = graph  # recompiles
    parent._modules[name] = new


def outline_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Run every layer of ``gm`` as a submodule call at its own path (in place; returns ``gm``): the
    :class:`OutlineLayers` pass."""
    return run_passes(gm, OutlineLayers()).graph_module


class OutlineLayers(GraphPass):
    """Run every layer as a submodule call at its own path. Parameter names, outputs, gradients and
    ``.train()``/``.eval()`` behaviour are unchanged; ``gm.graftr_outlined`` lists the layers."""

    name = "outline_layers"

    def call(self, gm: fx.GraphModule) -> PassResult:
        _outline(gm)
        return PassResult(gm, True)


def _outline(gm: fx.GraphModule) -> None:
    graph = gm.graph
    stacks = stack_sizes(n for n, _ in gm.named_parameters())
    if not stacks:
        raise GraftrError(f"{type(gm).__name__} has no numbered layer stack to outline")
    group = _assign(graph, stacks)
    members: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if group[node] != ROOT:
            members.setdefault(group[node], []).append(node)
    if not members:
        raise GraftrError(f"{type(gm).__name__}: no graph node runs inside a layer; nothing to outline")
    order = _order(graph, group)

    root = fx.Graph(owning_module=gm, tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    root._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    for item in order:
        if isinstance(item, fx.Node):
            env[item] = root.node_copy(item, lambda a: env[a])
            continue
        nodes = members[item]
        sub, inputs, outputs = _build_layer(item, nodes, group)
        _install_layer(gm, item, sub, _layer_class(nodes, item))
        call = root.call_module(item, tuple(env[a] for a in inputs))
        fxmeta.set_stack(call, _stack_meta(nodes, item))
        for i, out in enumerate(outputs):
            env[out] = root.call_function(operator.getitem, (call, i))
            fxmeta.copy_meta(out, env[out])
    root.lint()
    gm.graph = root  # recompiles (GraftedModel keeps its HF-style forward)
    gm.graftr_outlined = sorted(members, key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])))
