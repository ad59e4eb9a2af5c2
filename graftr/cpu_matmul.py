"""A 16-bit base on a CPU: the frozen linears compute in fp32 (a training-only pass).

On a CPU without AMX (which has bf16 matrix units), PyTorch's bf16/fp16 matrix product is much slower than its fp32
one, and in one layout catastrophically so. Measured on this project's development machine (AVX-512, one core,
``(256 × 4096) @ (4096 × 4096)``)::

    bf16 x @ W.T   (a linear's forward, W stored (out, in))          1.78 s    4.8 GFLOP/s
    bf16 g @ W     (its backward to the input: cpublas' plain loop)  49.8 s    0.2 GFLOP/s
    fp32 g @ W     (MKL), the bf16 operands upcast first              0.38 s   22.6 GFLOP/s

so one backward through Llama-2-7B at 256 tokens would take hours. The pass keeps the weights stored in 16 bits
(the memory ``train.precision: bf16`` is for) and replaces each frozen ``aten.linear`` with :func:`linear_fp32`:
``y = (x.float() @ W.float().T + b).to(x.dtype)``, its backward ``g.float() @ W.float()``. The fp32 copy of one
weight lives only during its product. Adapters see the same input and output nodes (the site's values keep their
dtype); the LM head stays an ``aten.linear`` (the fused loss finds it and computes in fp32 the same way,
:func:`graftr.loss.linear_cross_entropy`). Results differ from a bf16 product by the rounding of the product's
accumulation, not by an extra rounding: the output is rounded to the model's dtype once, as bf16 kernels do.

Not run where bf16 products are fast: CUDA, and CPUs with AMX tiles (:func:`wanted`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from graftr.passbase import GraphPass, PassResult

_LINEAR = torch.ops.aten.linear.default


def slow_half_matmul(device: torch.device) -> bool:
    """Whether 16-bit matrix products on ``device`` are slower than fp32 ones: a CPU without AMX tiles."""
    if device.type != "cpu":
        return False
    amx = getattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported", None)
    return not (amx is not None and amx())


def wanted(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and slow_half_matmul(device)


class _LinearFP32(torch.autograd.Function):
    """``linear(x, W, b)`` of a frozen ``W`` computed in fp32, output in ``x``'s dtype; backward to ``x`` (and a
    trainable bias) in fp32 too. ``W`` is referenced, not saved: under ZeRO-3 DeepSpeed gathers it again for the
    layer's backward, as for the rest of the layer's parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        ctx.meta = (x.dtype, None if bias is None else bias.dtype)
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_dtype, bias_dtype = ctx.meta
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.float() @ ctx.weight.float()).to(x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(bias_dtype)
        return grad_x, None, grad_b


def linear_fp32(x, weight, bias=None):
    """The graph op of a frozen 16-bit linear on a CPU (see the module docstring)."""
    return _LinearFP32.apply(x, weight, bias)


class CpuMatmulPass(GraphPass):
    """Frozen ``aten.linear`` nodes (not the LM head's) → :func:`linear_fp32`. Run by the training set-up when
    :func:`wanted` (``graftr train`` on a CPU with ``train.precision: bf16 | fp16``)."""

    name = "cpu_fp32_matmul"

    def call(self, gm) -> PassResult:
        head = gm.graftr_embeddings.get("output") if hasattr(gm, "graftr_embeddings") else None
        head_weight = f"{head}.weight" if head else None
        changed = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is not _LINEAR:
                continue
            weight = node.args[1]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or weight.target == head_weight:
                continue
            try:
                param = gm.get_parameter(weight.target)
            except AttributeError:
                continue  # a buffer (a dequantized or merged weight): left as it is
            if param.requires_grad:
                continue
            node.target = linear_fp32
            changed += 1
        gm.graftr_fp32_matmuls = changed
        return PassResult(gm, changed > 0)
