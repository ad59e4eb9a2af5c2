"""Low-precision training: the frozen base in bf16/fp16, the trainable parameters with fp32 master weights.

``train.precision: bf16 | fp16`` traces the model on ``meta`` in that dtype and streams the checkpoint into it
(:func:`graftr.materialize.materialize`: a tensor stored in that dtype is used as mapped, one stored in another dtype
is cast one tensor at a time, so no fp32 copy of the model exists). Non-persistent buffers keep the dtype the model's
own code gives them (Llama's rotary ``inv_freq`` stays fp32 in a bf16 model, as its forward computes the rotary
tables in fp32).

The trainable parameters use DeepSpeed's mixed-precision optimizer (the choice and why: docs/training.md, "Large
models"): DeepSpeed casts the model's copy of every parameter to the training dtype, and its optimizer keeps an
fp32 master copy of each trainable one (ZeRO-1/2/3: the fp32 partitions; ZeRO-0: the flat fp32 groups of its
``FP16_Optimizer``/``FP16_UnfusedOptimizer``), updates the master and copies it back. :func:`full_fp32` reads those masters, so the saved
adapter holds the fp32 values the optimizer computed, not their bf16 rounding.
"""

from __future__ import annotations

import torch
from torch import nn


def full_fp32(engine, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The full fp32 master value of each of ``params`` (trainable parameters of ``engine``'s model), on CPU.

    A collective under ZeRO-3 (every rank must call it with the same parameters). Without mixed precision the
    parameter is its own master.
    """
    from torch._utils import _unflatten_dense_tensors

    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    optimizer = getattr(engine, "optimizer", None)
    # ZeRO-0 with bf16/fp16: DeepSpeed's FP16_Optimizer (a fused torch optimizer) keeps one flat fp32 tensor per
    # parameter group, its FP16_UnfusedOptimizer (torch's AdamW, as graftr passes) one fp32 tensor per parameter
    if isinstance(optimizer, FP16_Optimizer):
        for group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            for p, value in zip(group, _unflatten_dense_tensors(flat, group)):
                masters[id(p)] = value
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        for group, fp32_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for p, value in zip(group, fp32_group):
                masters[id(p)] = value
    out = []
    for p in params:
        value = masters.get(id(p))
        if value is None:
            value = safe_get_full_fp32_param(p)  # ZeRO partitions (None without them: p is the value)
        out.append((p if value is None else value).detach().float().cpu())
    return out


def partition_zero3(gm: nn.Module, ds_config: dict, dtype: torch.dtype) -> None:
    """Partition every parameter of ``gm`` across the ranks now, one parameter at a time (ZeRO-3).

    ``deepspeed.initialize`` given a model whose parameters are whole first broadcasts the whole model from rank 0
    and only then partitions it. The weights were streamed from the checkpoint as copy-on-write mappings, so that
    broadcast would make every other rank write, and so hold, a private copy of all of them (13.5 GB per rank for
    Llama-2-7B). ``deepspeed.zero.Init(module=...)`` broadcasts and partitions parameter by parameter instead, and
    ``deepspeed.initialize`` then takes the model as already partitioned. As DeepSpeed would for a whole model, the
    trainable parameters are first cast to the training dtype (the optimizer keeps their fp32 masters).
    """
    import deepspeed

    if dtype != torch.float32:
        for p in gm.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    deepspeed.zero.Init(module=gm, config_dict_or_path=ds_config, dtype=dtype, mem_efficient_linear=False)
