"""Training checkpoints for exact resume, written so that a crash at any moment leaves a usable one behind.

``out/checkpoints/step-N/`` holds DeepSpeed's own checkpoint (``engine.save_checkpoint``: trainable parameters,
optimizer and scheduler state, ZeRO partitions; the frozen base is not saved), ``rng_rank<R>.pt`` with the Python,
NumPy, torch and accelerator RNG states of every rank, and ``graftr.json`` (the step, the running totals and
the run's fingerprint). The data position needs no state of its own: the order of an epoch is a function of the
seed and the epoch (``DistributedSampler``), so step N resumes at micro-batch ``(N mod steps_per_epoch) × accum``.

Atomicity
    every rank writes into ``step-N.tmp``; after a barrier rank 0 fsyncs it, renames it to ``step-N`` (a single
    rename: the directory is complete or absent) and then replaces ``latest`` through a temporary file. A kill
    before the rename leaves a ``.tmp`` directory that is never read (and is deleted on resume); a kill between
    the rename and ``latest`` leaves a complete ``step-N`` that :func:`latest` finds, because it goes by the
    complete directories, not by the ``latest`` file (which exists for DeepSpeed's ``zero_to_fp32.py``).
    Multi-node runs need ``--out`` on a filesystem every node sees, as DeepSpeed's own checkpoints do.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from graftr.errors import GraftrError
from graftr.formats.files import write_text_atomically

LATEST = "latest"
META = "graftr.json"
_COMPLETE = re.compile(r"^step-(\d+)$")


def _tag(step: int) -> str:
    return f"step-{step}"


def complete(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(directory)
    return found[-1] if found else None


def remove_incomplete(directory: Path) -> list[str]:
    """Delete the ``step-N.tmp`` leftovers of an interrupted save (rank 0); returns their names."""
    stale = [p for p in directory.iterdir() if p.is_dir() and p.name.endswith(".tmp")] if directory.is_dir() else []
    for p in stale:
        shutil.rmtree(p)
    return [p.name for p in stale]


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, directory: Path, step: int, meta: dict, *, keep: int) -> Path:
    """Save a checkpoint of ``engine`` after ``step`` (every rank calls this); returns ``directory/step-N``."""
    import torch.distributed as dist

    rank = dist.get_rank()
    final, tmp = directory / _tag(step), directory / f"{_tag(step)}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that a crash interrupted
            shutil.rmtree(tmp)
    dist.barrier()
    # trainable parameters, optimizer, scheduler and ZeRO partitions; the frozen base comes from the model again
    engine.save_checkpoint(str(directory), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
    rng = tmp / f"rng_rank{rank}.pt"
    torch.save(rng_state(), rng.with_suffix(".part"))
    os.replace(rng.with_suffix(".part"), rng)
    dist.barrier()  # every rank's files are in tmp
    if rank == 0:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        for path in [*tmp.rglob("*"), tmp]:
            _fsync(path)
        os.rename(tmp, final)  # the checkpoint becomes visible complete, or not at all
        write_text_atomically(directory / LATEST, final.name)
        _fsync(directory)
        for old in complete(directory)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GraftrError(f"{path} is not a graftr checkpoint ({META}: {e})") from None


def check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume when the run cannot continue exactly: other batch geometry, data, trainable tensors."""
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in current.items()
             if key != "trainable" and saved.get(key) != value]
    if saved.get("trainable") != current["trainable"]:
        before, now = set(saved.get("trainable") or {}), set(current["trainable"])
        changed = sorted(before ^ now) or sorted(n for n in now if saved["trainable"][n] != current["trainable"][n])
        diffs.append(f"trainable tensors differ ({len(changed)}: {', '.join(changed[:3])})")
    if diffs:
        raise GraftrError(f"cannot resume from {path}: the run differs from the one that saved it ("
                          + "; ".join(diffs) + "); use another --out to start a new run")


def load(engine, path: Path) -> None:
    """Restore ``engine`` (parameters, optimizer, scheduler) and this rank's RNG states from ``path``."""
    import torch.distributed as dist

    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise GraftrError(f"DeepSpeed could not load the checkpoint {path}")
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if not rng.is_file():
        raise GraftrError(f"{path} has no {rng.name}: it was saved by fewer processes than are running now")
    set_rng_state(torch.load(rng, weights_only=False))
