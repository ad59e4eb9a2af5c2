"""Many adapters in one batch: each row of a batch picks its adapter (``adapter_index`` (B,), a graph input).

N named adapters of the same structure (:mod:`graftr.named`: one recipe trained N times, or recipes that insert the
same modules at the same sites) become one: each module of the first adapter is replaced by a :class:`Bank` holding
the N adapters' parameters stacked on a new leading dimension, and its node reads ``adapter_index``; the other
adapters' nodes and modules leave the graph. A bank computes, for every row ``b``::

    out[b] = module(args[b]; θ[adapter_index[b]])

with the module's own code (``torch.func.functional_call`` with row ``b``'s parameters, ``torch.func.vmap`` over
the rows), so every kind banks the same way: IA³ picks a vector per row, InA/LoRA an A and a B per row (the
products become batched matmuls), gated prompts a prompt and a gate per row (the prompt keys and values are
projected per row), a shared prompt generator a prompt per row. Arguments without a batch dimension (frozen
projection weights, a layer number) are shared by all rows. Which arguments carry the batch is found by running
the graph at two batch sizes (:func:`batch_dims`).

Each row computes exactly what its adapter computes alone (tested to 1e-5 against the named adapters one at a
time). Use: ``graftr deploy A B C --out DIR`` (the artifact's programs take ``adapter_index``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from graftr.errors import GraftrError

INPUT = "adapter_index"


class Bank(nn.Module):
    """N modules of one type and shape as one: parameters stacked (N, ...), row ``b`` computed with set
    ``index[b]``. ``modes[i]`` says how argument ``i`` meets the rows: ``"row"`` (it has the batch dimension: row
    ``b`` gets ``arg[b:b+1]``), ``"bank"`` (another bank's per-row output: row ``b`` gets ``arg[b]``) or None
    (shared). ``batched_out``: the module's output has the batch dimension (else each row's output is stacked)."""

    def __init__(self, members: list[nn.Module], modes: list[str | None], batched_out: bool):
        super().__init__()
        self.__dict__["template"] = members[0]  # the code; its parameters are replaced by each row's
        self.names = [name for name, _ in members[0].named_parameters()]
        for name in self.names:
            stacked = torch.stack([m.get_parameter(name).detach() for m in members])
            self.register_parameter(name.replace(".", "__"), nn.Parameter(stacked, requires_grad=False))
        self.modes, self.batched_out, self.size = modes, batched_out, len(members)

    def forward(self, *args):
        *args, index = args
        params = {name: getattr(self, name.replace(".", "__"))[index] for name in self.names}  # (B, ...) each

        def row(p, *row_args):
            row_args = [a.unsqueeze(0) if mode == "row" else a for a, mode in zip(row_args, self.modes)]
            out = torch.func.functional_call(self.template, p, tuple(row_args), strict=False)
            return tree_map(lambda t: t.squeeze(0), out) if self.batched_out else out

        in_dims = (0, *[None if mode is None or a is None else 0 for a, mode in zip(args, self.modes)])
        return torch.func.vmap(row, in_dims=in_dims)(params, *args)

    def extra_repr(self) -> str:
        return f"{type(self.template).__name__} × {self.size}, modes={self.modes}"


def _shape0(value) -> tuple | None:
    leaves = [v for v in (value if isinstance(value, (tuple, list)) else [value]) if torch.is_tensor(v)]
    return tuple(v.shape[0] if v.dim() else None for v in leaves) if leaves else None


def batch_dims(gm, targets: list[str], example) -> dict[str, tuple[list[bool], bool]]:
    """``{module path: (which arguments have the batch dimension, whether its output has it)}`` for the modules at
    ``targets``, from two runs of ``gm`` at batch sizes 2 and 3 (``example(batch)`` gives its keyword inputs). A
    module called several times in a forward (a shared prompt generator, once per layer) must agree across calls."""
    seen: dict[str, list] = {t: [] for t in targets}
    hooks = []
    for target in targets:
        def hook(module, args, out, target=target):
            seen[target].append(([_shape0(a) for a in args], _shape0(out)))
        hooks.append(gm.get_submodule(target).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in (2, 3):
                gm(**example(batch))
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for target, runs in seen.items():
        calls = len(runs) // 2  # a shared prompt generator runs once per layer
        if not calls or len(runs) % 2:
            raise GraftrError(f"cannot bank {target}: it did not run the same number of times at two batch sizes")
        found = set()
        for (args2, out2), (args3, out3) in zip(runs[:calls], runs[calls:]):
            found.add((tuple(a != b and a is not None for a, b in zip(args2, args3)), out2 != out3))
        if len(found) != 1:
            raise GraftrError(f"cannot bank {target}: its calls differ in which arguments carry the batch")
        batched_args, batched_out = found.pop()
        result[target] = (list(batched_args), batched_out)
    return result


def bank_adapters(gm, names: list[str]) -> int:
    """Replace the named adapters ``names`` of ``gm`` by one bank (row ``b`` uses ``names[adapter_index[b]]``) and
    add the ``adapter_index`` input; returns N. For export and inference: named-adapter switching no longer applies."""
    from graftr import fxmeta
    from graftr.generate import positions
    from graftr.named import named, remove, set_active
    from graftr.trace import add_graph_input

    if len(names) < 2:
        raise GraftrError("a bank needs two or more adapters")
    if gm.graftr_outlined:
        raise GraftrError("cannot bank adapters on an outlined graph (activation checkpointing is on)")
    if "pixel_values" in gm.graftr_input_names:
        raise GraftrError("adapters with an image input (vision:) hold the model alone; they cannot share a batch")
    records = [named(gm, n) for n in names]
    first = records[0]
    for record in records[1:]:
        why = _difference(gm, first, record)
        if why is not None:
            raise GraftrError(f"adapters {first.name!r} and {record.name!r} cannot share a batch: {why}")
    for record in records:
        for target in record.targets:
            if (reason := gm.get_submodule(target).detach_refusal()) is not None:
                mode = " (mode: prefix)" if getattr(gm.get_submodule(target), "causal", None) is not None else ""
                raise GraftrError(f"adapter {record.name!r} cannot share a batch: a bank keeps one adapter's nodes "
                                  f"and removes the others', and {reason.split(' (')[0]}{mode}; deploy it alone")
    set_active(gm, [first.name], inference_mode=True)
    vocab = gm.hf_config.vocab_size

    def example(batch: int) -> dict:
        ids = torch.randint(3, vocab, (batch, 4), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in gm.graftr_input_names:
            inputs["position_ids"] = positions(mask)
        return inputs

    dims = batch_dims(gm, first.modules, example)
    index = add_graph_input(gm, INPUT)
    banked, banks = set(), {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in dims:
            continue
        batched_args, batched_out = dims[node.target]
        modes = []
        for arg, batched in zip(node.args, batched_args):
            source = arg.args[0] if isinstance(arg, torch.fx.Node) and arg.op == "call_function" \
                and arg.args and arg.args[0] in banked else arg
            modes.append("bank" if source in banked else "row" if batched else None)
        if node.target not in banks:
            members = [gm.get_submodule(_member(node.target, first, r)) for r in records]
            banks[node.target] = Bank(members, modes, batched_out)
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, banks[node.target])
        elif banks[node.target].modes != modes:
            raise GraftrError(f"cannot bank {node.target}: its calls take their arguments differently")
        node.args = (*node.args, index)
        fxmeta.drop_value(node)
        banked.add(node)
    for record in records[1:]:
        remove(gm, record)
    gm.recompile()
    return len(records)


def _member(target: str, first, record) -> str:
    """The module of ``record`` at the place of ``first``'s module ``target``."""
    return record.modules[first.modules.index(target)]


def _difference(gm, a, b) -> str | None:
    """Why adapters ``a`` and ``b`` do not have the same structure (one line), else None."""
    if len(a.modules) != len(b.modules):
        return f"{len(a.modules)} modules against {len(b.modules)}"
    for x, y in zip(a.modules, b.modules):
        mx, my = gm.get_submodule(x), gm.get_submodule(y)
        if type(mx) is not type(my):
            return f"{x} is {type(mx).__name__}, {y} is {type(my).__name__}"
        px = {n: tuple(p.shape) for n, p in mx.named_parameters()}
        py = {n: tuple(p.shape) for n, p in my.named_parameters()}
        if px != py:
            return f"{x} and {y} hold different tensors ({px} against {py})"
        if repr(mx) != repr(my).replace(f"@{b.name}", f"@{a.name}" if "@" in x else ""):
            return f"{x} and {y} are configured differently ({mx!r} against {my!r})"
    return None
