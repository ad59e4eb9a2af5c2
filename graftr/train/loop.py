"""The training loop: one flat function that reads top to bottom (nanoGPT's ``train.py`` is the model).

resolve the model → tokenizer and data → build on ``meta``, trace, graft (adapters exist before DeepSpeed sees the
model) → load the real weights into the graph → outline the layers (ZeRO-3) → compile (optional) →
``deepspeed.initialize`` with the trainable parameters only → resume → steps (accumulation, schedule, clipping,
evaluation, checkpoints) → final evaluation → adapter export (full fp32 tensors, rank 0) → summary.

Every rank runs this function; only rank 0 prints, records metrics and writes the adapter.
"""

from __future__ import annotations

import math
import os
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from graftr.errors import GraftrError
from graftr.loss import IGNORE_INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _init_distributed():
    """Join the launcher's process group, or make a group of one for a plain ``graftr train``."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from graftr.train.command import _free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # said explicitly, DeepSpeed skips its accelerator probe and warning
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")  # DeepSpeed's INFO lines would interleave with the progress bar
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if get_accelerator().device_name() == "cpu":
        _unlink_shm_allreduce_buffer(rank, world)
    return rank, world, int(os.environ["LOCAL_RANK"])


def _unlink_shm_allreduce_buffer(rank: int, world: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    On CPU, DeepSpeed's process-group set-up creates a 67 MB POSIX shared-memory segment per rank
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlinks it, so every run would leave
    67 MB per rank of RAM behind in /dev/shm. Unlinking after a barrier keeps the mappings valid for this run.
    """
    if world > 1:
        torch.distributed.barrier()  # every rank has opened every other rank's segment
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def train(recipe, *, model_id: str | None, data: str, out: str | Path, resume: bool, console) -> dict:
    """Train ``recipe``'s adapters on ``model_id`` with ``data``; write ``out/``. Returns the summary."""
    rank, world, local_rank = _init_distributed()  # first: it picks DeepSpeed's accelerator before the import
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from graftr.data import Collator, build_datasets
    from graftr.evaluate import evaluate
    from graftr.grafted import graft
    from graftr.io import save_adapter
    from graftr.materialize import build_empty, materialize, set_graph_device
    from graftr.models import infer_task, load_tokenizer, resolve
    from graftr.outline import outline_layers
    from graftr.train import checkpoint
    from graftr.train.config import deepspeed_config, lr_factor, merge_user_config, total_steps, warmup
    from graftr.train.metrics import Recorder, eval_text, progress_bar, summary_table

    cfg = recipe.train
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    t_start = time.perf_counter()

    # ---- processes ------------------------------------------------------------------------------------------
    accelerator = get_accelerator()
    main = rank == 0
    say = console.print if main else (lambda *a, **k: None)
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
    if not model_id:
        raise GraftrError("no model given: pass --model (a model directory with weights) or set the recipe's model")

    # ---- where this run starts -------------------------------------------------------------------------------
    start_from = checkpoint.latest(ckpt_dir)
    if start_from is not None and not resume:
        raise GraftrError(f"{out} holds checkpoints of an earlier run (newest {start_from.name}); pass --resume to "
                          "continue it or choose another --out")
    if resume and start_from is None:
        say(f"[yellow]note:[/] --resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
    for note in cfg.notes():
        say(f"[yellow]note:[/] {note}")

    # ---- model source, tokenizer, data -------------------------------------------------------------------------
    source = resolve(model_id)
    say(f"[dim]{source.note}[/]")
    if source.directory is None:  # a bundled config snapshot or a bare config.json: structure without weights
        raise GraftrError(f"{model_id} resolves to a config only ({source.kind}); training needs the weights: "
                          "pass a model directory with *.safetensors, or a hub id in the local cache")
    task = recipe.task or infer_task(source.config)
    tokenizer = load_tokenizer(source)
    train_set, eval_set, info = build_datasets(data, cfg.data, tokenizer, task=task, seed=cfg.seed)
    for note in info.notes:
        say(f"[yellow]note:[/] {note}")
    num_labels = recipe.num_labels
    if task == "seq_cls":
        if num_labels is not None and num_labels != info.num_labels:
            raise GraftrError(f"the recipe says num_labels {num_labels} but {data} has {info.num_labels} labels "
                              f"({', '.join(info.label_names)})")
        num_labels = info.num_labels
    if cfg.eval_every and eval_set is None:
        say("[yellow]note:[/] train.eval_every has no effect: the data has no eval split")

    # ---- model: trace on meta, graft, load the weights ----------------------------------------------------------
    dtype = DTYPES[cfg.precision]
    seed_everything(cfg.seed)  # adapter and new-head init: identical on every rank, and run to run
    gm = graft(build_empty(source.config, task, dtype=dtype, num_labels=num_labels), recipe,
               model_id=source.model_id)
    for line in materialize(gm, source.directory, dtype=dtype):  # e.g. "newly initialized: classifier.weight, ..."
        say(f"[dim]{line}[/]")
    if info.label_names is not None:  # the saved adapter's manifest carries the class names (eval, inference)
        gm.hf_config.id2label = dict(enumerate(info.label_names))
        gm.hf_config.label2id = {name: i for i, name in enumerate(info.label_names)}
    if cfg.outline():
        outline_layers(gm)  # each layer a submodule: ZeRO-3 gathers and frees one layer at a time
        say(f"[dim]outlined {len(gm.graftr_outlined)} layers: ZeRO-3 gathers one layer's parameters at a time[/]")
    if device.type != "cpu":
        set_graph_device(gm, device)  # materialize() made the graph's device constants CPU
    gm.train()
    if cfg.compile:
        # compile the generated graph code (the HF-style keyword wrapper around it stays eager); dynamic batch and
        # sequence dims, so varying padded lengths do not recompile. Eval mode compiles once more.
        gm.compile_graph(dynamic=True)
    trainable_names = {n: list(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    n_trainable, n_total = gm.trainable_counts()

    # ---- batches: every rank its own shard of a seeded permutation, re-shuffled each epoch ---------------------------
    keep = set(gm.graftr_input_names) | {"labels"}  # tokenizers may add columns the graph does not take
    collator = Collator(tokenizer)

    def collate(examples):
        return {k: v for k, v in collator(examples).items() if k in keep}

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    mbs, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // mbs // accum
    if steps_per_epoch == 0:
        raise GraftrError(f"the train split has {len(train_set)} examples, fewer than one optimizer step needs "
                          f"(micro_batch_size {mbs} × gradient_accumulation_steps {accum} × {world} processes)")
    skipped = len(sampler) - steps_per_epoch * accum * mbs
    if skipped:
        say(f"[yellow]note:[/] the last {skipped * world} examples of each (shuffled) epoch do not fill an optimizer "
            "step and are skipped")
    total = total_steps(cfg, steps_per_epoch)
    warmup_steps = warmup(cfg, total)
    if warmup_steps >= total:
        say(f"[yellow]note:[/] warmup ({warmup_steps} steps) covers the whole run ({total} steps): lr_schedule "
            f"{cfg.lr_schedule} never applies")
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(EvalShard(eval_set, rank, world), batch_size=mbs, shuffle=False, collate_fn=collate)

    # ---- optimizer, schedule, DeepSpeed ------------------------------------------------------------------------
    trainable = [p for p in gm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # vectors: no decay
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    decays = [g["weight_decay"] for g in groups]
    # DeepSpeed steps the scheduler once per optimizer step; step s runs at lr × lr_factor(s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=warmup_steps, total=total, schedule=cfg.lr_schedule))
    ds_config = deepspeed_config(cfg, world)
    if cfg.deepspeed_config is not None:
        ds_config, overridden = merge_user_config(ds_config, cfg.deepspeed_config)
        for note in overridden:
            say(f"[yellow]note:[/] {note}")
    engine, _, _, scheduler = deepspeed.initialize(model=gm, optimizer=optimizer, lr_scheduler=scheduler,
                                                   model_parameters=trainable, config=ds_config)

    # ---- resume ------------------------------------------------------------------------------------------------
    fingerprint = {"world_size": world, "micro_batch_size": mbs, "gradient_accumulation_steps": accum,
                   "seed": cfg.seed, "train_examples": len(train_set), "zero_stage": cfg.zero_stage,
                   "precision": cfg.precision, "trainable": trainable_names}
    # may differ on resume (a lower lr after a divergence, more steps); the current values are used
    schedule = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule,
                "warmup_steps": warmup_steps, "total_steps": total}
    step, tokens_seen, train_seconds, best = 0, 0, 0.0, None
    if main and ckpt_dir.is_dir():
        for name in checkpoint.remove_incomplete(ckpt_dir):
            say(f"[yellow]note:[/] removed {ckpt_dir / name}, a checkpoint whose save was interrupted")
    if resume and start_from is not None:
        meta = checkpoint.read_meta(start_from)
        checkpoint.check_fingerprint(start_from, meta["fingerprint"], fingerprint)
        checkpoint.load(engine, start_from)  # parameters, optimizer, scheduler, this rank's RNG states
        step, tokens_seen, train_seconds, best = meta["step"], meta["tokens"], meta["train_seconds"], meta["best"]
        say(f"resumed from {start_from} at step {step}/{total}")
        changed = {k: (meta["schedule"][k], v) for k, v in schedule.items()
                   if k in meta.get("schedule", {}) and meta["schedule"][k] != v}
        if changed:
            # the loaded optimizer and scheduler states carry the saved lr and weight decay: set the current ones
            # (the schedule's shape is a function of the current settings already)
            scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
            for group, decay in zip(optimizer.param_groups, decays):
                group["initial_lr"], group["weight_decay"] = cfg.lr, decay
                group["lr"] = cfg.lr * lr_factor(step, warmup_steps=warmup_steps, total=total,
                                                 schedule=cfg.lr_schedule)
            say(f"[yellow]note:[/] settings changed since {start_from.name} ("
                + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                + f"): steps after {step} use the new ones")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out, resume_step=step) if main else None
    is_better = (lambda new, old: new["accuracy"] > old["accuracy"]) if task == "seq_cls" else \
        (lambda new, old: new["loss"] < old["loss"])

    def run_eval() -> dict:
        nonlocal best
        metrics = evaluate(engine, eval_loader, task=task, distributed=world > 1)
        metrics = {k: v for k, v in metrics.items() if k in ("loss", "accuracy", "perplexity")}
        best = {"step": step, **metrics} if best is None or is_better(metrics, best) else best
        if main:
            recorder.write({"kind": "eval", "step": step, **metrics})
        say(f"eval  step {step:>5}  {eval_text(metrics)}")
        return metrics

    say(f"training [bold]{n_trainable:,}[/] of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%) on "
        f"{world} process(es), ZeRO-{cfg.zero_stage}, {cfg.precision}: {total} steps of {mbs * accum * world} "
        f"examples ({steps_per_epoch} steps per epoch), lr {cfg.lr:g} {cfg.lr_schedule}, warmup {warmup_steps}")

    # ---- the loop ----------------------------------------------------------------------------------------------
    last_eval: dict | None = None
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}  # since the last log line
    progress = progress_bar(console) if main else None
    if progress is not None:
        progress.start()
        bar = progress.add_task("train", total=total, completed=step, loss="-", lr="-", speed="-")
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)  # the epoch's permutation depends on (seed, epoch) only
            order = list(sampler)
            batches = [order[i * mbs:(i + 1) * mbs] for i in range(steps_per_epoch * accum)]
            # a private generator: creating the loader must not draw from the global RNG (dropout uses it), or a
            # resumed run, which creates it mid-epoch, would see other dropout masks than an uninterrupted one
            loader = iter(DataLoader(train_set, batch_sampler=batches[offset * accum:], collate_fn=collate,
                                     generator=torch.Generator()))
            for _ in range(offset, steps_per_epoch):
                if step >= total:
                    break
                t_step = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]  # the lr this step runs at
                # loss sum over micro-batches, micro-batches, tokens, non-finite losses (summed over ranks below)
                stats = torch.zeros(4, dtype=torch.float64, device=device)
                for micro in range(accum):
                    batch = {k: v.to(device) for k, v in next(loader).items()}
                    loss = engine(**batch).loss
                    engine.backward(loss)  # DeepSpeed scales by 1/accum and reduces gradients at the boundary
                    stats += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device),
                                          batch["attention_mask"].sum().double(),
                                          (~torch.isfinite(loss.detach())).double()])
                    if micro < accum - 1:
                        engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                dist.all_reduce(stats)  # every rank decides the same way below
                if stats[3] > 0:  # never apply a step computed from a non-finite loss
                    last = checkpoint.latest(ckpt_dir)
                    # the run is deterministic: resumed unchanged from that checkpoint, it computes this loss again
                    kept = (f"the newest checkpoint is {last}; to continue, --resume with a lower train.lr (or delete "
                            "it to resume from an older one)" if last else
                            "no checkpoint was saved before it" + (" (save_every is 0)" if not cfg.save_every else ""))
                    raise GraftrError(f"non-finite loss ({stats[0].item() / stats[1].item()}) at step {step + 1}: "
                                      f"training stopped, nothing after step {step} was applied; {kept}")
                engine.step()  # the boundary: clip, optimizer step, scheduler step, zero the gradients
                step += 1
                tokens_seen += int(stats[2].item())
                train_seconds += time.perf_counter() - t_step
                window["loss"] += stats[0].item() / stats[1].item()
                window["steps"] += 1
                window["tokens"] += int(stats[2].item())
                if progress is not None:
                    progress.update(bar, completed=step, loss=f"{stats[0].item() / stats[1].item():.4f}",
                                    lr=f"{lr:.2e}", speed=f"{tokens_seen / max(train_seconds, 1e-9):,.0f}")
                if step % cfg.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - window["start"]
                    grad_norm = engine.get_global_grad_norm()  # None under ZeRO-0 without clipping statistics
                    record = {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                              "loss": window["loss"] / window["steps"], "lr": lr,
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "tokens": tokens_seen, "tokens_per_s": window["tokens"] / elapsed,
                              "elapsed_s": time.perf_counter() - t_start}
                    if main:
                        recorder.write(record)
                    say(f"train step {step:>5}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                        f"{record['tokens_per_s']:,.0f} tok/s")
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
                if eval_loader is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = {"step": step, **run_eval()}
                if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                    path = checkpoint.save(engine, ckpt_dir, step, {
                        "fingerprint": fingerprint, "schedule": schedule, "tokens": tokens_seen,
                        "train_seconds": train_seconds, "best": best}, keep=cfg.keep_checkpoints)
                    say(f"[dim]saved {path}[/]")
        if progress is not None:
            progress.stop()
        # ---- final evaluation ----------------------------------------------------------------------------------
        if eval_loader is not None and (last_eval is None or last_eval["step"] != step):
            last_eval = {"step": step, **run_eval()}
    finally:
        if progress is not None:
            progress.stop()
        if recorder is not None:
            recorder.close()

    # ---- adapter export, summary ---------------------------------------------------------------------------------
    # full fp32 tensors: the optimizer's master copy, gathered from the ZeRO partitions (a collective: all ranks)
    from graftr.train.precision import full_fp32

    names = [n for n, p in gm.named_parameters() if p.requires_grad]
    tensors = dict(zip(names, full_fp32(engine, [gm.get_parameter(n) for n in names])))
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "epochs": step / steps_per_epoch, "final_eval": last_eval, "best_eval": best,
               "train_seconds": train_seconds, "elapsed_seconds": elapsed,
               "tokens_per_s": tokens_seen / max(train_seconds, 1e-9), "trainable_params": n_trainable,
               "total_params": n_total, "world_size": world, "adapter": str(out / "adapter")}
    if main:
        save_adapter(gm, out / "adapter", tensors=tensors, extra={"training": summary})
        rows = [("steps", f"{step} ({summary['epochs']:.2f} epochs)"),
                ("final eval", eval_text(last_eval) if last_eval else "no eval split"),
                ("best eval", f"{eval_text(best)} (step {best['step']})" if best else "-"),
                ("time", f"{train_seconds:.1f} s training, {elapsed:.1f} s total"),
                ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
                ("trainable params", f"{n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%)"),
                ("adapter", str(out / "adapter")), ("metrics", str(out / "metrics.jsonl"))]
        console.print(summary_table(rows, f"{recipe.name}: trained on {world} process(es)"))
    dist.barrier()  # no rank leaves before the adapter is written
    return summary
