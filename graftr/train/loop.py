"""The training loop: named set-up steps, then a flat loop body (torchtune's recipes and nanoGPT are the model).

:func:`train` reads top to bottom:

1. :func:`~graftr.train.distributed.init_distributed` and :func:`setup_device` — the process group, this rank's
   device, the precision it supports;
2. :func:`starting_point` — an ``--out`` that can take the run (:func:`check_out`); a fresh run or the newest
   checkpoint that verifies (``--resume``); a run refused in steps 3-7 removes an ``--out`` it made and never wrote
   into (:func:`remove_unused_out`);
3. :func:`setup_data` — resolve the model, load its tokenizer, tokenize the train and eval splits;
4. :func:`setup_model` — build on ``meta``, trace and graft (adapters exist before DeepSpeed sees the model), load
   the real weights into the graph, outline the layers (ZeRO-3), compile (optional);
5. :func:`setup_batches` — every rank its shard of a seeded permutation, the schedule's length and warmup;
6. :func:`setup_engine` — AdamW over the trainable parameters, the lr schedule, ``deepspeed.initialize``;
7. :func:`restore` — the checkpoint's parameters, optimizer, scheduler, RNG states and running totals;
8. the loop: per optimizer step, the micro-batches' forward and backward (:func:`accumulate`), a check that the
   step can be applied (:func:`unusable_step`), the step and its gradient norm (:func:`check_gradient`), then
   logging, evaluation (:func:`run_eval`) and checkpoints when due;
9. the final evaluation, the adapter (full fp32 tensors gathered from ZeRO, rank 0) and the summary
   (:func:`write_adapter`).

Every rank runs this; only rank 0 prints, records metrics and writes the adapter.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from graftr.errors import GraftrError
from graftr.loss import IGNORE_INDEX
from graftr.names import torch_dtype
from graftr.train.distributed import gathered_adapter_state, init_distributed


class EvalShard(Dataset):
    """Examples ``rank, rank + world, ...`` of the eval set, padded to the same length on every rank.

    Every rank must run the same number of forward passes (ZeRO-3's forward gathers parameters collectively), so
    the shorter shards repeat an example whose labels are all ``-100``: it is computed but never scored.
    """

    def __init__(self, data: Dataset, rank: int, world: int):
        self.data = data
        self.indices = [rank + world * i for i in range(math.ceil(len(data) / world))]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        if index < len(self.data):
            return self.data[index]
        example = dict(self.data[index % len(self.data)])
        labels = example["labels"]
        example["labels"] = [IGNORE_INDEX] * len(labels) if isinstance(labels, list) else IGNORE_INDEX
        return example


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- what the set-up steps produce -----------------------------------------------------------------------------
@dataclass
class Run:
    """The run's settings and where this process stands in it."""

    cfg: Any  # graftr.train.config.TrainConfig
    out: Path
    rank: int
    world: int
    say: Callable[..., None]  # prints on rank 0 only
    started: float = field(default_factory=time.perf_counter)
    defaults: str | None = None  # which train: settings came from the adapter kinds' papers (the start line says)
    estimate: int | None = None  # graftr estimate's bytes per rank (rank 0; None: not available for this model)
    parameters: int | None = None  # the model's parameters, frozen and trainable, as the estimate counted them
    title: str = ""  # of the run's plot: "<recipe> on <model>"
    created: list[Path] = field(default_factory=list)  # the directories check_out made for --out (rank 0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class Data:
    source: Any  # graftr.models.ModelSource
    task: str
    tokenizer: Any
    train_set: Dataset
    eval_set: Dataset | None
    label_names: list[str] | None
    num_labels: int | None
    longest: int  # tokens of the longest example (packing: of the longest document), before truncation
    answers: Any = None  # graftr.data.Answers: the eval split's checkable answers (train.data.eval_metric)


@dataclass
class Batches:
    """Which examples each optimizer step takes, and how many steps the run has."""

    sampler: DistributedSampler
    collate: Callable[[list[dict]], dict]
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total: int
    warmup_steps: int
    eval_loader: DataLoader | None


@dataclass
class Engine:
    """DeepSpeed's engine and the client optimizer and scheduler it steps."""

    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LambdaLR
    decays: list[float]  # each parameter group's weight decay, as the recipe sets it now


@dataclass
class Progress:
    """The running totals a checkpoint saves and a resumed run continues from."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best: dict | None = None  # the best evaluation so far: {"step", "loss", ...}
    last_eval: dict | None = None


# ---- set-up steps ----------------------------------------------------------------------------------------------
def estimate_memory(run: Run, recipe, data: Data) -> None:
    """Print ``graftr estimate``'s line for this run (rank 0; from the config on ``meta``, nothing read), for the
    longest batch the data makes (the longest example, at most ``max_length``); the end of the run prints the
    measured peak beside it. A model the estimate cannot count gets a note, not an error."""
    from graftr.estimate import estimate

    from graftr.baselines import PeftBaseline

    if not run.main or isinstance(recipe, PeftBaseline):  # a PEFT model is not graftr's to count
        return
    try:
        est = estimate(recipe, data.source.model_id, run.world, seq_len=longest_batch(data.longest, run.cfg.data))
    except Exception as e:  # noqa: BLE001 -- informational: a bad model or recipe fails below with its own error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.say(f"[dim]memory estimate not available: {reason}[/]")
        return
    run.estimate = est.total
    run.parameters = est.counts.get("base", 0) + est.counts.get("trainable", 0)
    run.say(f"[dim]{est.line()}[/]")


def longest_batch(longest: int, cfg) -> int:
    """The longest row a batch can hold: every packed block is ``max_length`` long; else the longest example, at
    most ``max_length``."""
    return cfg.max_length if cfg.packing else min(longest, cfg.max_length)


def setup_memory(run: Run, device: torch.device) -> None:
    """On a CPU, whether freed activations go back to the system (:func:`graftr.train.memory.decide`: where the
    estimate says memory is tight, or as ``train.return_freed_memory`` says); every rank decides from rank 0's
    estimate."""
    import torch.distributed as dist

    from graftr.train import memory

    if device.type != "cpu":
        return
    estimate = [run.estimate, run.parameters]  # rank 0's (the other ranks do not estimate)
    if run.world > 1:
        dist.broadcast_object_list(estimate, src=0)
    apply, note = memory.decide(run.cfg.return_freed_memory, estimate[0], int(os.environ.get("LOCAL_SIZE", "1")),
                                memory.available(), parameters=estimate[1])
    if apply and memory.return_freed_memory() and note:
        run.say(f"[yellow]note:[/] {note}")


def setup_device(cfg, local_rank: int) -> torch.device:
    """This rank's device and thread count; refuses a precision the device does not support."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # processes on one machine share its cores; each taking all of them would oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    if cfg.precision == "bf16" and not accelerator.is_bf16_supported():
        raise GraftrError(f"train.precision bf16 is not supported by this {accelerator.device_name()} device")
    if cfg.precision == "fp16" and not accelerator.is_fp16_supported():
        raise GraftrError(f"train.precision fp16 is not supported on {accelerator.device_name()} "
                          "(DeepSpeed runs fp16 on GPUs); use bf16 or fp32")
    return device


# what graftr writes into a run's --out; anything else there belongs to someone else
RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard", "loss.png")
# what a run killed while writing atomically leaves beside them (write_dir_atomically, graftr.plot): removed
LEFTOVERS = re.compile(r"^\.(adapter\.(tmp|old)-\d+-\d+|loss\.png\.\d+\.tmp)$")


def check_out(run: Run, resume: bool) -> None:
    """Refuse an ``--out`` the run cannot use, before any work: a file, a directory holding files graftr did not
    write, an earlier run without ``--resume``, or one that cannot be created or written (rank 0 creates it and
    records the directories it made in ``run.created``)."""
    out = run.out
    if out.exists() and not out.is_dir():
        raise GraftrError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        if run.main:
            for leftover in [p for p in out.iterdir() if LEFTOVERS.match(p.name)]:
                run.say(f"[yellow]note:[/] removed {leftover}, left by a run stopped while writing it")
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not LEFTOVERS.match(p.name))
        if foreign:
            more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
            raise GraftrError(f"--out {out} holds files that are not a graftr run ({', '.join(foreign[:3])}{more}); "
                              "choose an empty or new directory")
        if (out / "adapter").exists() and not (out / "adapter" / "manifest.json").is_file():
            raise GraftrError(f"--out {out}: {out / 'adapter'} exists and is not a graftr adapter; graftr would "
                              "replace it at the end of training")
        earlier = [name for name in ("adapter", "metrics.jsonl") if (out / name).exists()]
        if earlier and not resume:
            raise GraftrError(f"--out {out} holds an earlier run ({', '.join(earlier)}); pass --resume to continue "
                              "it or choose another --out")
    if run.main:
        missing = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GraftrError(f"cannot create --out {out}: {e.strerror or e}") from None
        run.created = missing
        if not os.access(out, os.W_OK | os.X_OK):
            raise GraftrError(f"cannot write into --out {out}: permission denied")


def remove_unused_out(run: Run) -> None:
    """Remove the directories :func:`check_out` made for this run, innermost first, while they are empty (rank 0):
    a run refused in its set-up (a bad model, tokenizer, data or recipe) leaves no empty ``--out`` behind. A
    directory that existed before the run (``--resume``'s, an empty one of yours) or that holds anything stays."""
    for directory in run.created:
        try:
            directory.rmdir()  # only ever an empty directory
        except OSError:
            return


def starting_point(run: Run, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: step 0): the newest that verifies (rank 0 checks, every rank gets its
    choice); refuses an unusable ``--out`` and starting over an earlier run without ``--resume``."""
    from graftr.train import checkpoint

    check_out(run, resume)  # before any work: an --out that cannot take the run is refused now, not at the end
    newest = checkpoint.latest(run.checkpoints)
    if newest is not None and not resume:
        raise GraftrError(f"{run.out} holds checkpoints of an earlier run (newest {newest.name}); pass --resume "
                          "to continue it or choose another --out")
    start_from = None
    if resume:
        start_from, skipped = checkpoint.choose(run.checkpoints)
        for note in skipped:
            run.say(f"[yellow]note:[/] --resume skips {note}")
        if start_from is None and newest is not None:
            raise GraftrError(f"--resume: no checkpoint in {run.checkpoints} verifies ("
                              f"{'; '.join(skipped) or 'see rank 0'}); remove them to start the run over")
        if newest is None:
            run.say(f"[yellow]note:[/] --resume: no complete checkpoint in {run.checkpoints}; starting from step 0")
    for note in run.cfg.notes():
        run.say(f"[yellow]note:[/] {note}")
    return start_from


def positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: relative positions, no limit)."""
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if limit and "roberta" in getattr(text, "model_type", ""):  # positions start after the padding index
        limit -= (text.pad_token_id or 0) + 1
    return limit


def fit_max_length(data_cfg, config, say):
    """``data_cfg`` with a default ``max_length`` cut to the model's positions (noted); a longer one set in the
    recipe is an error (the traced graph cannot run longer sequences)."""
    limit = positions(config)
    if not limit or data_cfg.max_length <= limit:
        return data_cfg
    if "max_length" in data_cfg.model_fields_set:
        raise GraftrError(f"train.data.max_length {data_cfg.max_length} is longer than the model's "
                          f"{limit} positions; set it to {limit} or less")
    say(f"[yellow]note:[/] train.data.max_length is {limit}, the model's positions (the default is "
        f"{data_cfg.max_length})")
    return type(data_cfg).model_validate({**data_cfg.model_dump(exclude_unset=True), "max_length": limit})


def setup_data(run: Run, recipe, model_id: str, data: str) -> Data:
    """Resolve the model (weights required), load its tokenizer, tokenize the splits; the classifier's labels."""
    from graftr.data import build_datasets
    from graftr.models import infer_task, load_tokenizer, resolve

    source = resolve(model_id)
    run.say(f"[dim]{source.note}[/]")
    if source.directory is None:  # a bundled config snapshot or a bare config.json: structure without weights
        raise GraftrError(f"{model_id} resolves to a config only ({source.kind}); training needs the weights: "
                          "pass a model directory with *.safetensors, or a hub id in the local cache")
    task = recipe.task or infer_task(source.config)
    tokenizer = load_tokenizer(source)
    run.cfg.data = fit_max_length(run.cfg.data, source.config, run.say)
    train_set, eval_set, info = build_datasets(data, run.cfg.data, tokenizer, task=task, seed=run.cfg.seed)
    run.cfg.data = info.config  # the inferred format is recorded in the adapter's recipe (eval reads it back)
    for note in info.notes:
        run.say(f"[yellow]note:[/] {note}")
    num_labels = recipe.num_labels
    if task == "seq_cls":
        if num_labels is not None and num_labels != info.num_labels:
            raise GraftrError(f"the recipe says num_labels {num_labels} but {data} has {info.num_labels} labels "
                              f"({', '.join(info.label_names)})")
        num_labels = info.num_labels
    if run.cfg.eval_every and eval_set is None:
        run.say("[yellow]note:[/] train.eval_every has no effect: the data has no eval split")
    return Data(source, task, tokenizer, train_set, eval_set, info.label_names, num_labels, info.max_length_seen,
                info.answers)


def setup_model(run: Run, recipe, data: Data, device: torch.device):
    """Trace on ``meta``, graft, load the weights into the graph; outline, move and compile as configured. A PEFT
    baseline (``graftr compare``) is its HF model wrapped by PEFT instead (:mod:`graftr.baselines`)."""
    from graftr import baselines, cpu_matmul, quantize

    if isinstance(recipe, baselines.PeftBaseline):
        return baselines.build(run, recipe, data, device)
    from graftr.grafted import graft
    from graftr.materialize import build_empty, materialize, set_graph_device
    from graftr.outline import outline_layers
    from graftr.passbase import run_passes

    cfg = run.cfg
    dtype = torch_dtype(cfg.precision)
    seed_everything(cfg.seed)  # adapter and new-head init: identical on every rank, and run to run
    gm = graft(build_empty(data.source.config, data.task, dtype=dtype, num_labels=data.num_labels), recipe,
               model_id=data.source.model_id)
    for line in materialize(gm, data.source.directory, dtype=dtype):  # "newly initialized: classifier.weight, ..."
        run.say(f"[dim]{line}[/]")
    if (line := quantize.summary(gm)) is not None:  # the recipe's quantize: (quantized while loading)
        run.say(f"[dim]{line}[/]")
    if cpu_matmul.wanted(device, dtype):  # 16-bit products are slow on this CPU: the frozen linears in fp32
        run_passes(gm, cpu_matmul.CpuMatmulPass())
    if getattr(gm, "graftr_fp32_matmuls", 0):
        run.say(f"[dim]{gm.graftr_fp32_matmuls} frozen linears compute in fp32 on this CPU (weights stay "
                f"{cfg.precision}; graftr.cpu_matmul)[/]")
    if data.label_names is not None:  # the saved adapter's manifest carries the class names (eval, inference)
        gm.hf_config.id2label = dict(enumerate(data.label_names))
        gm.hf_config.label2id = {name: i for i, name in enumerate(data.label_names)}
    if cfg.outline():
        outline_layers(gm)  # each layer a submodule: ZeRO-3 gathers and frees one layer at a time
        run.say(f"[dim]outlined {len(gm.graftr_outlined)} layers" + (
            ": ZeRO-3 gathers one layer's parameters at a time" if cfg.zero_stage == 3 else "") + "[/]")
    if cfg.activation_checkpointing == "layers":
        gm.gradient_checkpointing_enable()  # each outlined layer recomputed in backward (graftr.checkpointing)
        run.say(f"[dim]activation checkpointing: {len(gm.graftr_outlined)} layers recomputed in backward[/]")
    if device.type != "cpu":
        set_graph_device(gm, device)  # materialize() made the graph's device constants CPU
    gm.train()
    if cfg.compile:
        # compile the generated graph code (the HF-style keyword wrapper around it stays eager); dynamic batch and
        # sequence dims, so varying padded lengths do not recompile. Eval mode compiles once more.
        gm.compile_graph(dynamic=True)
    return gm


def setup_batches(run: Run, data: Data, gm) -> Batches:
    """Every rank its own shard of a seeded permutation, re-shuffled each epoch; the run's length and warmup."""
    from graftr.data import Collator
    from graftr.train.config import resolve_defaults, total_steps, warmup
    from graftr.vision import processor_for

    world = run.world
    # lr, schedule, warmup, weight decay the recipe leaves unset: the adapter kinds' published values
    recipe = getattr(gm, "recipe", None)  # None: a PEFT baseline, whose train settings are given in full
    run.cfg, run.defaults = resolve_defaults(run.cfg, [rule.adapter for rule in recipe.rules] if recipe else [],
                                             run.cfg.micro_batch_size * run.cfg.gradient_accumulation_steps * world)
    cfg = run.cfg
    if recipe is not None:
        recipe.train = cfg  # the adapter's recipe records the values trained with
    # tokenizers may add columns the graph does not take (an HF model takes what its forward names)
    keep = set(gm.graftr_input_names) | {"labels"} if recipe is not None else None
    collator = Collator(data.tokenizer, image_processor=processor_for(gm))  # images: the encoder's own processor

    def collate(examples):
        return {k: v for k, v in collator(examples).items() if keep is None or k in keep}

    sampler = DistributedSampler(data.train_set, num_replicas=world, rank=run.rank, shuffle=True, seed=cfg.seed)
    mbs, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // mbs // accum
    if steps_per_epoch == 0:
        raise GraftrError(f"the train split has {len(data.train_set)} examples, fewer than one optimizer step needs "
                          f"(micro_batch_size {mbs} × gradient_accumulation_steps {accum} × {world} processes)")
    skipped = len(sampler) - steps_per_epoch * accum * mbs
    if skipped:
        run.say(f"[yellow]note:[/] the last {skipped * world} examples of each (shuffled) epoch do not fill an "
                "optimizer step and are skipped")
    total = total_steps(cfg, steps_per_epoch)
    warmup_steps = warmup(cfg, total)
    if warmup_steps >= total:
        run.say(f"[yellow]note:[/] warmup ({warmup_steps} steps) covers the whole run ({total} steps): lr_schedule "
                f"{cfg.lr_schedule} never applies")
    eval_loader = None
    if data.eval_set is not None:
        eval_loader = DataLoader(EvalShard(data.eval_set, run.rank, world), batch_size=mbs, shuffle=False,
                                 collate_fn=collate)
    return Batches(sampler, collate, mbs, accum, steps_per_epoch, total, warmup_steps, eval_loader)


def setup_engine(run: Run, gm, batches: Batches) -> Engine:
    """AdamW (no weight decay on vectors) and the lr schedule over the trainable parameters, handed to DeepSpeed."""
    import deepspeed

    from graftr.train import checkpoint
    from graftr.train.config import deepspeed_config, lr_factor, merge_user_config

    cfg = run.cfg
    trainable = [p for p in gm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # vectors: no decay
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    # DeepSpeed steps the scheduler once per optimizer step; step s runs at lr × lr_factor(s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=batches.warmup_steps, total=batches.total, schedule=cfg.lr_schedule))
    ds_config = deepspeed_config(cfg, run.world)
    if cfg.deepspeed_config is not None:
        ds_config, overridden = merge_user_config(ds_config, cfg.deepspeed_config)
        for note in overridden:
            run.say(f"[yellow]note:[/] {note}")
    if cfg.zero_stage == 3:
        from graftr.train.precision import partition_zero3

        partition_zero3(gm, ds_config, torch_dtype(cfg.precision))  # one parameter at a time (see there)
    engine, _, _, scheduler = deepspeed.initialize(model=gm, optimizer=optimizer, lr_scheduler=scheduler,
                                                   model_parameters=trainable, config=ds_config)
    checkpoint.install_engine(engine)  # checkpoints load as data only; a failed write is reported, not raised
    return Engine(engine, optimizer, scheduler, [g["weight_decay"] for g in groups])


def fingerprint(run: Run, data: Data, batches: Batches, gm) -> dict:
    """What must not change for a checkpoint to resume exactly: batch geometry, data, seed, trainable tensors."""
    cfg = run.cfg
    return {"world_size": run.world, "micro_batch_size": batches.micro_batch_size,
            "gradient_accumulation_steps": batches.accumulation, "seed": cfg.seed,
            "train_examples": len(data.train_set), "zero_stage": cfg.zero_stage, "precision": cfg.precision,
            "trainable": {n: list(p.shape) for n, p in gm.named_parameters() if p.requires_grad}}


def schedule_settings(run: Run, batches: Batches) -> dict:
    """The settings that may differ on resume (a lower lr after a divergence, more steps); the current ones win."""
    cfg = run.cfg
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule,
            "warmup_steps": batches.warmup_steps, "total_steps": batches.total}


def restore(run: Run, engine: Engine, batches: Batches, start_from: Path | None, *, fingerprint: dict,
            schedule: dict) -> Progress:
    """Remove interrupted saves; load ``start_from`` (parameters, optimizer, scheduler, RNG states, running totals)
    and apply lr/weight-decay settings changed since it was saved. Returns where the loop starts."""
    from graftr.train import checkpoint
    from graftr.train.config import lr_factor

    cfg, ckpt_dir = run.cfg, run.checkpoints
    progress = Progress()
    if run.main and ckpt_dir.is_dir():
        for name in checkpoint.remove_incomplete(ckpt_dir):
            run.say(f"[yellow]note:[/] removed {ckpt_dir / name}, a checkpoint whose save was interrupted")
    if start_from is None:
        return progress
    meta = checkpoint.read_meta(start_from)
    checkpoint.check_fingerprint(start_from, meta["fingerprint"], fingerprint)
    checkpoint.load(engine.engine, start_from)  # parameters, optimizer, scheduler, this rank's RNG states
    progress = Progress(meta["step"], meta["tokens"], meta["train_seconds"], meta["best"])
    step = progress.step
    run.say(f"resumed from {start_from} at step {step}/{batches.total}")
    changed = {k: (meta["schedule"][k], v) for k, v in schedule.items()
               if k in meta.get("schedule", {}) and meta["schedule"][k] != v}
    if changed:
        # the loaded optimizer and scheduler states carry the saved lr and weight decay: set the current ones
        # (the schedule's shape is a function of the current settings already)
        engine.scheduler.base_lrs = [cfg.lr] * len(engine.scheduler.base_lrs)
        for group, decay in zip(engine.optimizer.param_groups, engine.decays):
            group["initial_lr"], group["weight_decay"] = cfg.lr, decay
            group["lr"] = cfg.lr * lr_factor(step, warmup_steps=batches.warmup_steps, total=batches.total,
                                             schedule=cfg.lr_schedule)
        run.say(f"[yellow]note:[/] settings changed since {start_from.name} ("
                + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                + f"): steps after {step} use the new ones")
    return progress


# ---- the loop's parts ------------------------------------------------------------------------------------------
def epoch_batches(data: Data, batches: Batches, step: int):
    """The micro-batches of ``step``'s epoch from ``step`` on (a resumed run starts mid-epoch)."""
    epoch, offset = divmod(step, batches.steps_per_epoch)
    batches.sampler.set_epoch(epoch)  # the epoch's permutation depends on (seed, epoch) only
    order = list(batches.sampler)
    mbs, accum = batches.micro_batch_size, batches.accumulation
    micro = [order[i * mbs:(i + 1) * mbs] for i in range(batches.steps_per_epoch * accum)]
    # a private generator: creating the loader must not draw from the global RNG (dropout uses it), or a resumed
    # run, which creates it mid-epoch, would see other dropout masks than an uninterrupted one
    return iter(DataLoader(data.train_set, batch_sampler=micro[offset * accum:], collate_fn=batches.collate,
                           generator=torch.Generator()))


def accumulate(engine, loader, accumulation: int, device: torch.device, task: str, world: int) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches. Returns this rank's (loss, weight, tokens,
    non-finite losses, micro-batches without a scored label); summed over the ranks, loss / weight is the step's loss.

    A language model's loss is the mean over every label the step scores, on all micro-batches of all ranks (as
    transformers' Trainer does with ``num_items_in_batch``): each micro-batch's summed loss is divided by the
    step's global label count, so uneven micro-batches (alpaca rows of different lengths, ranks with different
    token counts) give the gradient of one batch of the whole step, and ``--nproc 2`` trains as one process with
    twice the micro-batch. DeepSpeed averages gradients over the ranks, so the loss handed to backward is scaled
    by the world size (and not divided by the accumulation steps). Other tasks average their micro-batches' means.
    """
    import torch.distributed as dist

    from graftr.grafted import _LM_LOSS_SHIFT, _scored

    micro_batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(accumulation)]
    stats = torch.zeros(5, dtype=torch.float64, device=device)
    count = None
    if task in _LM_LOSS_SHIFT:
        count = torch.stack([_scored(b["labels"], _LM_LOSS_SHIFT[task]) for b in micro_batches]).sum()
        if world > 1:
            dist.all_reduce(count)
        if count.item() == 0:  # no label anywhere in the step: the mean over nothing is undefined
            stats[4] = accumulation
            return stats
    for micro, batch in enumerate(micro_batches):
        if count is None:
            loss = engine(**batch).loss
            engine.backward(loss)  # DeepSpeed scales by 1/accum and averages the ranks' gradients at the boundary
            part = torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
        else:
            loss = engine(**batch, num_items_in_batch=count).loss  # this micro-batch's share of the step's mean
            engine.backward(loss * world, scale_wrt_gas=False)
            part = torch.stack([loss.detach().double(),
                                torch.full((), 1 / (accumulation * world), dtype=torch.float64, device=device)])
        empty = (batch["labels"] != IGNORE_INDEX).sum() == 0
        stats += torch.cat([part, torch.stack([batch["attention_mask"].sum().double(),
                                               (~torch.isfinite(loss.detach())).double(),
                                               (empty & (count is None)).double()])])
        if micro < accumulation - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    return stats


def kept(run: Run) -> str:
    """What a run stopped by a non-finite value leaves to resume from (the run is deterministic: resumed unchanged
    from that checkpoint, it computes the same value again)."""
    from graftr.train import checkpoint

    last = checkpoint.latest(run.checkpoints)
    if last is None:
        return "no checkpoint was saved before it" + (" (save_every is 0)" if not run.cfg.save_every else "")
    return f"the newest checkpoint is {last}; to continue, --resume with a lower train.lr (or delete it to resume " \
           "from an older one)"


def unusable_step(run: Run, stats: torch.Tensor, step: int) -> GraftrError | None:
    """The error that stops a run whose step cannot be applied (nothing of it is): a micro-batch without a label
    to learn from (the mean over no token is nan: say so, not "lower the lr"), or a non-finite loss."""
    if stats[4] > 0:
        return GraftrError(f"step {step + 1}: {int(stats[4].item())} micro-batch(es) have no token to learn from "
                           "(every label is -100, e.g. train.data.max_length cuts off every response); the loss is "
                           f"undefined: training stopped, nothing after step {step} was applied")
    if stats[3] > 0:
        return GraftrError(f"non-finite loss ({stats[0].item() / stats[1].item()}) at step {step + 1}: training "
                           f"stopped, nothing after step {step} was applied; {kept(run)}")
    return None


def check_gradient(run: Run, engine, step: int, noted: bool) -> bool:
    """After the optimizer step ``step`` (1-based): a non-finite gradient norm of a finite loss stops the run (the
    update was not finite; fp16's loss scaling skips such steps itself); a norm of exactly 0 is said once (the
    loss cannot improve). Returns whether the zero norm has been said."""
    grad_norm = engine.get_global_grad_norm()  # None under ZeRO-0 without clipping statistics
    if grad_norm is None:
        return noted
    if not math.isfinite(float(grad_norm)) and run.cfg.precision != "fp16":
        raise GraftrError(f"non-finite gradient norm ({float(grad_norm)}) at step {step}: training stopped before "
                          f"anything after step {step - 1} was saved; {kept(run)}")
    if float(grad_norm) == 0.0 and not noted:
        run.say(f"[yellow]note:[/] the gradient of every trainable tensor is 0 at step {step}: the loss cannot "
                "improve (do the adapters reach the loss? is every trainable tensor initialised so that its "
                "gradient vanishes?)")
        return True
    return noted


class Window:
    """Mean loss and throughput since the last log line.

    Throughput is tokens over the steps' own time (not evaluation or checkpoint saving), and leaves out this
    process's first step, which pays the start-up (optimizer state allocation, first calls); a window holding only
    that step goes by its time.
    """

    def __init__(self):
        self.loss, self.steps, self.tokens = 0.0, 0, 0
        self.timed_tokens, self.timed_seconds, self.timed_steps, self.last_speed = 0, 0.0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float, first: bool) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.last_speed = tokens / max(seconds, 1e-9)
        if not first:
            self.timed_tokens += tokens
            self.timed_seconds += seconds
            self.timed_steps += 1

    def speed(self) -> float:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else self.last_speed

    def step_time(self) -> float | None:
        """Mean seconds per step of the timed steps (None: only the start-up step so far)."""
        return self.timed_seconds / self.timed_steps if self.timed_steps else None

    def record(self, run: Run, engine, progress: Progress, batches: Batches, lr: float) -> dict:
        grad_norm = engine.get_global_grad_norm()  # None under ZeRO-0 without clipping statistics
        return {"kind": "train", "step": progress.step, "epoch": progress.step / batches.steps_per_epoch,
                "loss": self.loss / self.steps, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": progress.tokens, "tokens_per_s": self.speed(), "step_s": self.step_time(),
                "elapsed_s": time.perf_counter() - run.started}


def run_eval(run: Run, engine, batches: Batches, progress: Progress, data: Data, recorder) -> dict:
    """Evaluate on every rank's eval shard (and the held-out answers, every rank the whole set); record the numbers
    and keep the best. Returns ``{"step", ...}``."""
    from graftr.evaluate import answer_metric, evaluate
    from graftr.train.metrics import EVAL_KEYS, eval_text

    answers = data.answers
    metrics = {}
    if answers is None or answers.metric != "choice":  # a choice set gives the split's loss too (answer_metric)
        metrics = evaluate(engine, batches.eval_loader, task=data.task, distributed=run.world > 1)
    if answers is not None:
        metrics.update(answer_metric(engine, answers, batches.collate, data.tokenizer,
                                     batch_size=batches.micro_batch_size))
    metrics = {k: v for k, v in metrics.items() if k in EVAL_KEYS}
    best = progress.best
    key = held_out_key(metrics)
    better = best is None or (metrics[key] > best[key] if key else metrics["loss"] < best["loss"])
    if better:
        progress.best = {"step": progress.step, **metrics}
    if recorder is not None:
        recorder.write({"kind": "eval", "step": progress.step, **metrics})
        draw_plot(run, recorder)
    run.say(f"eval  step {progress.step:>5}  {eval_text(metrics)}")
    progress.last_eval = {"step": progress.step, **metrics}
    return progress.last_eval


def held_out_key(metrics: dict) -> str | None:
    """The metric a better evaluation has more of (a classifier's or a choice set's accuracy, exact match), or None:
    then the lower loss is better."""
    return next((k for k in ("accuracy", "exact_match") if k in metrics), None)


def samples(engine, data: Data, count: int) -> list[str]:
    """Greedy answers to the first ``count`` held-out prompts (``train.samples``; a language model trained on alpaca
    or chat data; else none), shown before and after training; every rank generates (ZeRO-3 gathers collectively)."""
    from graftr.evaluate import greedy_answers

    prompts = sample_prompts(data, count)
    if not prompts or "pixel_values" in getattr(getattr(engine, "module", engine), "graftr_input_names", ()):
        return []  # an image-conditioned model answers about an image: graftr generate --image shows that
    return [" ".join(text.split()) for text in greedy_answers(engine, data.tokenizer, prompts,
                                                              max_new_tokens=SAMPLE_TOKENS)]


SAMPLE_TOKENS = 32  # new tokens of the held-out answers shown before and after training


def sample_prompts(data: Data, count: int) -> list[list[int]]:
    """The token ids of the first ``count`` held-out examples up to their answers (causal LMs with alpaca or chat
    data)."""
    if data.task != "causal_lm" or data.eval_set is None or count == 0:
        return []
    if data.answers is not None:
        return data.answers.prompts[:count]
    prompts = []
    for i in range(min(count, len(data.eval_set))):
        example = data.eval_set[i]
        first = next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX), None)
        if first:
            prompts.append(example["input_ids"][:first])
    return prompts


def draw_plot(run: Run, recorder) -> None:
    """``out/loss.png`` from the records so far (rank 0, after every evaluation and at the end)."""
    from graftr.plot import plot_run

    recorder.file.flush()
    plot_run(run.out, run.title)


def measured_peaks(run: Run, memory) -> list:
    """Every rank's measured peak memory (:mod:`graftr.train.memory`; a collective), printed by rank 0."""
    import torch.distributed as dist

    from graftr.train.memory import gib

    peak = memory.stop()
    peaks = [None] * run.world
    dist.all_gather_object(peaks, peak)
    run.say(f"measured peak memory per rank ({peak.device}): " + ", ".join(gib(p.peak) for p in peaks)
            + f" (sum {gib(sum(p.peak for p in peaks))})"
            + ("" if run.estimate is None else f"; estimated {gib(run.estimate)} per rank")
            + ("" if peak.anon is None else "; private (anonymous) part: " + ", ".join(gib(p.anon) for p in peaks)
               + f" (sum {gib(sum(p.anon for p in peaks))})"))
    return peaks


def write_adapter(run: Run, recipe, gm, engine, progress: Progress, batches: Batches, counts: tuple[int, int],
                  console, memory, shown: dict | None = None) -> dict:
    """Gather the full fp32 adapter tensors (a collective: all ranks), write the adapter with the run's summary
    (rank 0) and print it; ``counts`` are the trainable and all parameters; ``shown``: the base model's eval and
    sample answer, and the trained model's, for the before/after rows. Returns the summary."""
    from graftr import baselines
    from graftr.formats.graftr import save_adapter
    from graftr.train.metrics import eval_text, summary_table

    # full fp32 tensors: the optimizer's master copies (graftr.train.precision), gathered from the ZeRO partitions
    tensors = gathered_adapter_state(gm, masters_of=engine)
    n_trainable, n_total = counts
    elapsed = time.perf_counter() - run.started
    peaks = measured_peaks(run, memory)
    step, best, last_eval = progress.step, progress.best, progress.last_eval
    summary = {"steps": step, "epochs": step / batches.steps_per_epoch, "final_eval": last_eval, "best_eval": best,
               "train_seconds": progress.train_seconds, "elapsed_seconds": elapsed,
               "tokens_per_s": progress.tokens / max(progress.train_seconds, 1e-9), "trainable_params": n_trainable,
               "total_params": n_total, "world_size": run.world, "adapter": str(run.out / "adapter"),
               "peak_memory": [p.peak for p in peaks], "peak_private_memory": [p.anon for p in peaks],
               "memory_estimate": run.estimate}
    if shown is not None:
        summary["before"] = {"eval": shown["eval"], "answers": shown["samples"], "answers_after": shown["after"]}
    if run.main:
        # the run's own adapter/ (check_out made sure it is one): a resumed run replaces it
        if isinstance(recipe, baselines.PeftBaseline):
            baselines.save(gm, run.out / "adapter", tensors, {"training": summary})
        else:
            save_adapter(gm, run.out / "adapter", tensors=tensors, extra={"training": summary}, force=True)
        rows = [("steps", f"{step} ({summary['epochs']:.2f} epochs)"),
                ("final eval", eval_text(last_eval) if last_eval else "no eval split"),
                ("best eval", f"{eval_text(best)} (step {best['step']})" if best else "-"),
                *before_after(shown, last_eval),
                ("time", f"{progress.train_seconds:.1f} s training, {elapsed:.1f} s total"),
                ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
                ("trainable params", f"{n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%)"),
                ("adapter", str(run.out / "adapter")), ("metrics", str(run.out / "metrics.jsonl"))]
        console.print(summary_table(rows, f"{recipe.name}: trained on {run.world} process(es)"))
    return summary


def before_after(shown: dict | None, last_eval: dict | None) -> list[tuple[str, str]]:
    """Summary rows comparing the base model with the trained one: the held-out metric (or the loss), and the
    answers to one held-out prompt (the first whose answer training changed, else the first)."""
    if shown is None or last_eval is None:
        return []
    first = shown["eval"]
    key = held_out_key(last_eval) or "loss"
    rows = [(f"held-out {key.replace('_', ' ')}", f"{first[key]:.4f} before → {last_eval[key]:.4f} after")]
    if shown["samples"]:
        pairs = list(zip(shown["samples"], shown["after"], shown["references"] or [None] * len(shown["samples"])))
        before, after, reference = next((p for p in pairs if p[0] != p[1]), pairs[0])
        rows += [("answer before", repr(before)), ("answer after", repr(after))]
        if reference is not None:
            rows.append(("reference answer", repr(reference)))
    return rows


# ---- the whole run ---------------------------------------------------------------------------------------------
def train(recipe, *, model_id: str | None, data: str, out: str | Path, resume: bool, console) -> dict:
    """Train ``recipe``'s adapters on ``model_id`` with ``data``; write ``out/``. Returns the summary."""
    rank, world, local_rank = init_distributed()  # first: it picks DeepSpeed's accelerator before the import
    import torch.distributed as dist

    from graftr import baselines
    from graftr.trace import reuse_traces
    from graftr.train import checkpoint
    from graftr.train.memory import PeakMemory
    from graftr.train.metrics import Recorder, progress_bar

    say = console.print if rank == 0 else (lambda *a, **k: None)
    run = Run(recipe.train, Path(out), rank, world, say, title=f"{recipe.name} on {model_id}")
    cfg = run.cfg
    device = setup_device(cfg, local_rank)
    if not model_id:
        raise GraftrError("no model given: pass --model (a model directory with weights) or set the recipe's model")
    start_from = starting_point(run, resume)
    try:
        data = setup_data(run, recipe, model_id, data)
        with reuse_traces():  # the estimate's model and the trained one: the same meta model, traced once
            estimate_memory(run, recipe, data)  # on meta, before the measurement starts
            setup_memory(run, device)  # return freed memory to the system where the estimate says memory is tight
            memory = PeakMemory(device)  # after the data (and the libraries it imports), before any weight is read
            gm = setup_model(run, recipe, data, device)
        # before DeepSpeed: ZeRO-3 leaves empty placeholders in the module
        counts = gm.trainable_counts() if hasattr(gm, "trainable_counts") else baselines.trainable_counts(gm)
        batches = setup_batches(run, data, gm)
        cfg = run.cfg  # with the adapter kinds' defaults filled in
        resumed = fingerprint(run, data, batches, gm)
        ds = setup_engine(run, gm, batches)
        engine = ds.engine
        schedule = schedule_settings(run, batches)
        progress = restore(run, ds, batches, start_from, fingerprint=resumed, schedule=schedule)
    except GraftrError:  # refused before anything was written: no empty --out left behind
        remove_unused_out(run)
        raise
    recorder = Recorder(run.out, resume_step=progress.step, console=console) if run.main else None
    n_trainable, n_total = counts
    mbs, accum, total = batches.micro_batch_size, batches.accumulation, batches.total
    say(f"training [bold]{n_trainable:,}[/] of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%) on "
        f"{world} process(es), ZeRO-{cfg.zero_stage}, {cfg.precision}: {total} steps of {mbs * accum * world} "
        f"examples ({batches.steps_per_epoch} steps per epoch), lr {cfg.lr:g} {cfg.lr_schedule}, "
        f"warmup {batches.warmup_steps}" + (f" ({run.defaults})" if run.defaults else ""))

    before = None  # the base model's held-out numbers and sample answer, shown again beside the trained ones
    if batches.eval_loader is not None and progress.step == 0:
        before = {"eval": run_eval(run, engine, batches, progress, data, recorder),  # the curve starts at the base
                  "samples": samples(engine, data, cfg.samples)}
        if before["samples"]:
            say(f"answer before training: {before['samples'][0]!r}")
    flat_noted = False
    window, timed = Window(), Window()  # since the last log line; over the run (the bar's speed)
    first = True  # this process's first step: start-up, left out of the speed
    bar = progress_bar(console) if run.main else None
    if bar is not None:
        bar.start()
        task_id = bar.add_task("train", total=total, completed=progress.step, loss="-", lr="-", speed="-")
    try:
        while progress.step < total:
            loader = epoch_batches(data, batches, progress.step)
            for _ in range(progress.step % batches.steps_per_epoch, batches.steps_per_epoch):
                if progress.step >= total:
                    break
                t_step = time.perf_counter()
                lr = ds.optimizer.param_groups[0]["lr"]  # the lr this step runs at
                stats = accumulate(engine, loader, accum, device, data.task, run.world)
                dist.all_reduce(stats)  # every rank decides the same way below
                if (error := unusable_step(run, stats, progress.step)) is not None:  # never applied
                    raise error
                engine.step()  # the boundary: clip, optimizer step, scheduler step, zero the gradients
                flat_noted = check_gradient(run, engine, progress.step + 1, flat_noted)
                loss, tokens = stats[0].item() / stats[1].item(), int(stats[2].item())
                seconds = time.perf_counter() - t_step
                progress.step += 1
                progress.tokens += tokens
                progress.train_seconds += seconds
                window.add(loss, tokens, seconds, first)
                timed.add(loss, tokens, seconds, first)
                first = False
                step = progress.step
                if bar is not None:
                    bar.update(task_id, completed=step, lr=f"{lr:.2e}", speed=f"{timed.speed():,.0f}")
                if step % cfg.log_every == 0 or step == total:
                    record = window.record(run, engine, progress, batches, lr)
                    if recorder is not None:
                        recorder.write(record)
                    if bar is not None:  # the bar shows the logged loss (the mean since the last log line)
                        bar.update(task_id, loss=f"{record['loss']:.4f}")
                    say(f"train step {step:>5}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                        f"{record['tokens_per_s']:,.0f} tok/s")
                    window = Window()
                if batches.eval_loader is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval(run, engine, batches, progress, data, recorder)
                if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                    path = checkpoint.save(engine, run.checkpoints, step, {
                        "fingerprint": resumed, "schedule": schedule, "tokens": progress.tokens,
                        "train_seconds": progress.train_seconds, "best": progress.best}, keep=cfg.keep_checkpoints)
                    say(f"[dim]saved {path}[/]")
        if bar is not None:
            bar.stop()
        if batches.eval_loader is not None and (progress.last_eval is None
                                                 or progress.last_eval["step"] != progress.step):
            run_eval(run, engine, batches, progress, data, recorder)  # the final evaluation
        elif recorder is not None:
            draw_plot(run, recorder)
    finally:
        if bar is not None:
            bar.stop()
        if recorder is not None:
            recorder.close()

    shown = None
    if before is not None:
        shown = {**before, "after": samples(engine, data, cfg.samples),
                 "references": data.answers.references[:cfg.samples] if data.answers is not None else None}
    summary = write_adapter(run, recipe, gm, engine, progress, batches, counts, console, memory, shown)
    dist.barrier()  # no rank leaves before the adapter is written
    return summary
