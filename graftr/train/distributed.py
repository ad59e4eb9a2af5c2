"""The process group and ZeRO: joining the launcher's group (or making one of one), and full tensors from ZeRO.

Nothing here imports DeepSpeed at import time: :func:`init_distributed` imports it (after choosing its
accelerator), and :func:`gathered_adapter_state` uses it only when it is already imported, since only then can a
model be partitioned.

Under ZeRO-3 every parameter of the engine's module is a placeholder holding no data outside the forward and
backward of its module (``p.numel() == 0``; the real values are partitioned across ranks), so a state dict taken
from it is empty. :func:`gathered_adapter_state` gathers the trainable tensors (adapters and the recipe's trainable
modules) one by one into full CPU copies, under any ZeRO stage or none.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys

import torch
from torch import nn


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (the rendezvous port of a job on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether this process was started by a distributed launcher (and so is one rank of a job)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> tuple[int, int, int]:
    """Join the launcher's process group, or make a group of one for a plain ``graftr train``.

    Returns ``(rank, world size, local rank)``. Call it before anything imports DeepSpeed's accelerator: it says
    ``DS_ACCELERATOR=cpu`` on a machine without CUDA, which spares DeepSpeed its probe and warning."""
    if not launched():  # port 0: the store binds a port the kernel picks, so two runs never race for one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # said explicitly, DeepSpeed skips its accelerator probe and warning
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    from graftr.quiet import is_verbose

    ds_logger.setLevel("WARNING")  # DeepSpeed's INFO lines would interleave with the progress bar
    # DeepSpeed's communication backend JIT-builds its CPU shared-memory op on first start (45-90 s with a C++
    # compiler, silent; a run killed during the build leaves a lock that makes every later start wait forever).
    # The op serves only inference_all_reduce (tensor-parallel inference); training's collectives go through
    # torch.distributed (gloo on CPU) either way. DeepSpeed builds it only if this table says it is compatible,
    # and keeps the table for the process, so marking it incompatible skips the build, the lock and the 67 MB
    # shared-memory segment per rank that the op would allocate (and never free).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with contextlib.nullcontext() if is_verbose() else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=False, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def gathered_adapter_state(model: nn.Module, *, masters_of=None) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters of ``model`` (a DeepSpeed engine or the module it wraps).

    Names are the model's parameter names, as :meth:`graftr.grafted.GraftedModel.adapter_state_dict` gives them.
    Under ZeRO-3 each parameter is all-gathered, which is a collective: call this on every rank (and save on one).
    The values are the module's copies, in the dtype it trains in; with ``masters_of`` (the DeepSpeed engine training
    ``model``) they are its optimizer's fp32 master copies (:func:`graftr.train.precision.full_fp32`) — what a
    training run saves.
    """
    deepspeed = sys.modules.get("deepspeed")  # a model can only be partitioned if deepspeed is imported
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        model = model.module
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if masters_of is not None:
        from graftr.train.precision import full_fp32

        return dict(zip([name for name, _ in trainable], full_fp32(masters_of, [p for _, p in trainable])))
    state = {}
    for name, p in trainable:
        if hasattr(p, "ds_id"):  # a ZeRO-3 parameter; the same order on every rank keeps the gathers matched
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.detach().to("cpu", copy=True)
        else:
            state[name] = p.detach().to("cpu", copy=True)
    return state
