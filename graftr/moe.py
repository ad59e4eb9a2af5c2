"""Mixture-of-Experts in the traced graph: transformers 5's fused experts, and the products adapters add to them.

transformers 5 keeps a layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]; gpt-oss transposed, [E, H, 2I] and [E, I, H], with biases and gate/up
interleaved) and computes them through ``experts_implementation``:

* ``eager`` loops over the experts hit (``nonzero``): data-dependent shapes, not exportable;
* ``batched_mm`` gathers ``W[expert_ids]`` per routed token (an (S, out, in) copy of the weights) and calls ``bmm``;
* ``grouped_mm`` sorts the routed tokens by expert, counts them (``histc`` → ``cumsum`` offsets) and multiplies
  each expert's block of rows by its weight in one grouped product (``transformers::grouped_mm_fallback`` on CPU
  and under export, ``torch._grouped_mm`` where the kernel applies).

graftr pins **grouped_mm** before tracing (:func:`pin_experts_implementation`): it exports, keeps no per-token
weight copies, and gives every expert product the offsets an adapter needs to add its own products on the same
routed rows — LoRA's two extra grouped products (Unsloth's "split LoRA"), never E full weight deltas.
:func:`grouped_mm` is that product for the adapters (the op the base uses, so the same kernel and backward);
:func:`row_experts` gives each routed row its expert from the offsets.
"""

from __future__ import annotations

import torch
from torch import nn

from graftr.errors import GraftrError

PINNED = "grouped_mm"  # the one implementation graftr traces through


def _fallback_op():
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

    return torch.ops.transformers.grouped_mm_fallback.default


def grouped_ops() -> set:
    """The graph ops of an expert product: ``(x (S, in), w (E, in, out), offsets (E,)) -> (S, out)``."""
    ops = {_fallback_op()}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        ops.add(torch.ops.aten._grouped_mm.default)
    return ops


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fused-experts modules of ``model`` (those transformers' ``use_experts_implementation`` decorates)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "_is_expert_parallel") and hasattr(m, "config")}


def pin_experts_implementation(model: nn.Module) -> str | None:
    """Make every experts module of ``model`` compute through ``grouped_mm`` for tracing; returns what the model
    had (None for a model without fused experts). An experts module whose forward is its own (not transformers'
    dispatch) is refused by name, as is an expert-parallel model."""
    found = experts_modules(model)
    if not found:
        unknown = [n for n, m in model.named_modules()
                   if any(p.dim() == 3 for p in m.parameters(recurse=False)) and type(m).__name__.endswith("Experts")]
        if unknown:
            raise GraftrError(f"{unknown[0]} ({type(model.get_submodule(unknown[0])).__name__}) holds fused expert "
                              "weights but does not dispatch through transformers' experts_implementation; graftr "
                              "cannot trace its experts (supported: transformers 5's use_experts_implementation layouts)")
        return None
    name, first = next(iter(found.items()))
    if any(m._is_expert_parallel for m in found.values()):
        raise GraftrError(f"{name}: expert parallelism is not supported; load the model without it")
    config = getattr(model, "config", first.config)
    before = getattr(config, "_experts_implementation", None) or getattr(first.config, "_experts_implementation", None)
    if before != PINNED:
        setter = getattr(model, "set_experts_implementation", None)
        if setter is not None:
            setter(PINNED)
        for module in found.values():
            module.config._experts_implementation = PINNED
    return before


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` (S, in) rows sorted by expert, ``w`` (E, in, out), ``offsets`` (E,) cumulative rows per expert →
    (S, out): rows ``offsets[e-1]:offsets[e]`` times ``w[e]``. The op the base's expert products use."""
    return _fallback_op()(x.to(w.dtype), w, offsets)


def expert_histc(ids: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:
    """transformers' count of routed rows per expert, ``histc`` of the expert ids, with the input dtype its device
    takes (float on CPU, int on CUDA: deterministic histc supports only those). transformers picks it in Python from
    the device it runs on, so a graph traced on ``meta`` would bake CUDA's choice in; the trace normalization
    (:class:`graftr.trace.NormalizeModes`) routes every ``histc`` here instead."""
    source = ids.float() if ids.device.type in ("cpu", "mps") else ids.int()
    return torch.histc(source, bins=bins, min=min, max=max)


def row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each of ``rows`` routed rows sorted by expert (rows past ``offsets[-1]`` get the last)."""
    index = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, index, right=True).clamp_(max=offsets.numel() - 1)


class ExpertSubset(nn.Module):
    """Which experts of E an adapter holds parameters for (``experts:`` in a recipe's match): :meth:`full` expands a
    parameter of the selected experts (k, ...) to all E, the others zero (an identity for a LoRA branch; a scaling
    uses :meth:`full` with ``fill=1``). With every expert selected it returns the parameter itself. It holds no
    tensor, so the adapter's state is its parameters alone."""

    def __init__(self, num_experts: int, selected: list[int] | None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.selected = sorted(selected) if selected is not None else list(range(num_experts))

    @property
    def count(self) -> int:
        return len(self.selected)

    @property
    def everything(self) -> bool:
        return self.count == self.num_experts

    def full(self, param: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        if self.everything:
            return param
        out = param.new_full((self.num_experts, *param.shape[1:]), fill)
        return out.index_copy(0, torch.tensor(self.selected, dtype=torch.long, device=param.device), param)

    def extra_repr(self) -> str:
        return "all experts" if self.everything else f"experts {self.selected}"
