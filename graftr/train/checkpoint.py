"""Training checkpoints for exact resume, written so that a crash at any moment leaves a usable one behind, and
read as data only.

``out/checkpoints/step-N/`` holds DeepSpeed's own checkpoint (``engine.save_checkpoint``: trainable parameters,
optimizer and scheduler state, ZeRO partitions; the frozen base is not saved), ``rng_rank<R>.safetensors`` with the
Python, NumPy, torch and accelerator RNG states of every rank, and ``graftr.json`` (the step, the running totals,
the run's fingerprint and the size and SHA-256 of every other file). The data position needs no state of its own:
the order of an epoch is a function of the seed and the epoch (``DistributedSampler``), so step N resumes at
micro-batch ``(N mod steps_per_epoch) × accum``.

Atomicity
    every rank writes into ``step-N.tmp``; after a barrier rank 0 fsyncs it, renames it to ``step-N`` (a single
    rename: the directory is complete or absent) and then replaces ``latest`` through a temporary file. A kill
    before the rename leaves a ``.tmp`` directory that is never read (and is deleted on resume); a kill between
    the rename and ``latest`` leaves a complete ``step-N`` that :func:`choose` finds, because it goes by the
    complete directories, not by the ``latest`` file (which exists for DeepSpeed's ``zero_to_fp32.py``).
    Multi-node runs need ``--out`` on a filesystem every node sees, as DeepSpeed's own checkpoints do.
Verification
    ``--resume`` takes the newest checkpoint that verifies (:func:`verify`): its ``graftr.json`` lists exactly the
    files present, each with its size and hash, and every pickle in it holds only tensors and plain values. A
    checkpoint damaged later (a truncated file, a planted one) is skipped with a note naming the file.
No code runs from a checkpoint
    DeepSpeed's files are pickles; its torch checkpoint engine unpickles them with ``weights_only=False``, so a
    planted file would run code. graftr gives the engine its ``SafeCheckpointEngine`` (:func:`safe_engine_class`), which loads them with
    ``torch.load(weights_only=True)`` and the allow-list :data:`ALLOWED_GLOBALS` of the few DeepSpeed classes they
    hold (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``); :func:`verify` refuses any other
    global before anything is loaded. The RNG states are safetensors and JSON.
Write failures
    a full disk (or any write error) during a save is reported by every rank as one :class:`GraftrError` after the
    save: DeepSpeed's writes go through that engine, which records the failure instead of
    raising between DeepSpeed's collectives; the ``step-N.tmp`` is removed and the earlier checkpoints are intact.
    On a full disk the error says what a checkpoint takes and what is free (:func:`space`).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from graftr.errors import GraftrError, free_space, write_failure
from graftr.formats.files import write_text_atomically
from graftr.runtime import sha256

LATEST = "latest"
META = "graftr.json"
FORMAT_VERSION = 2  # 2: rng_rank<R>.safetensors and the file list with sizes and hashes
_COMPLETE = re.compile(r"^step-(\d+)$")
# The globals DeepSpeed's checkpoint pickles refer to besides tensors and containers (torch's weights-only
# unpickler allows those): ZeRO's stage enum, the fp16/bf16 loss scaler, the fragment map of ZeRO-1/2.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "collections.OrderedDict",
    "torch.Size",
)


def _allowed_objects() -> list:
    import importlib

    objects = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: verify() reports what it holds
            pass
    return objects


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` of a checkpoint file as data: tensors, containers and :data:`ALLOWED_GLOBALS` only."""
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for a refused global; RuntimeError/EOFError for a damaged file
        raise GraftrError(f"cannot load {path} as data: {str(e).strip().splitlines()[0]}") from None


@functools.cache
def safe_engine_class() -> type:
    """:class:`SafeCheckpointEngine`, made on first use (it subclasses DeepSpeed's engine; importing DeepSpeed
    takes seconds)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with :func:`safe_load` and recording write failures.

        ``save`` never raises for a failed write (a full disk): the failure is kept in :attr:`failures` and the
        partial file removed, so every rank goes through DeepSpeed's collectives of the save and :func:`save`
        reports the failure after them."""

        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.failures: list[tuple[str, str]] = []

        def save(self, state_dict, path: str):
            try:
                super().save(state_dict, path)
            except Exception as e:
                reason = write_failure(e, path)
                if reason is None:
                    raise
                self.failures.append((path, reason))
                Path(path).unlink(missing_ok=True)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    return SafeCheckpointEngine


def install_engine(engine) -> None:
    """Make ``engine`` (a DeepSpeed engine) save and load its checkpoints through :class:`SafeCheckpointEngine`."""
    engine.checkpoint_engine = safe_engine_class()(engine._config)


def _tag(step: int) -> str:
    return f"step-{step}"


def complete(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint (verified or not), or None."""
    found = complete(directory)
    return found[-1] if found else None


def _listing(directory: Path) -> dict[str, dict]:
    """Every file under ``directory`` but graftr.json: relative path → size and SHA-256."""
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != META}


def verify(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from, or None: graftr.json must list exactly the files there,
    each with its size and hash, and no pickle may refer to a global outside :data:`ALLOWED_GLOBALS`."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{META} cannot be read ({e})"
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or \
            not isinstance(meta.get("files"), dict):
        return f"{META} is not a graftr checkpoint record of format {FORMAT_VERSION}"
    listed = meta["files"]
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != META}
    if present - set(listed):
        return f"{sorted(present - set(listed))[0]} is not part of the checkpoint"
    for name, entry in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if not isinstance(entry, dict) or file.stat().st_size != entry.get("size"):
            return f"{name} is damaged (its size differs from the one saved)"
        if sha256(file) != entry.get("sha256"):
            return f"{name} is damaged (its content differs from the one saved)"
    allowed = set(ALLOWED_GLOBALS)
    for name in sorted(listed):
        if name.endswith(".pt"):
            try:
                unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path / name)
                          if g not in allowed]
            except Exception as e:
                return f"{name} is not a torch checkpoint file ({str(e).strip().splitlines()[0]})"
            if unsafe:
                return f"{name} refers to {', '.join(unsafe[:3])}, which graftr never unpickles (not plain data)"
    return None


def choose(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies (None if none does) and a note per newer one skipped. Rank 0 checks the
    files and the others receive its choice, so every rank resumes from the same step."""
    import torch.distributed as dist

    found = complete(directory)
    notes: list[str] = []
    index = -1
    if dist.get_rank() == 0:
        for i in reversed(range(len(found))):
            problem = verify(found[i])
            if problem is None:
                index = i
                break
            notes.append(f"{found[i]}: {problem}")
    if dist.get_world_size() > 1:
        chosen = torch.tensor([index], dtype=torch.int64)
        dist.broadcast(chosen, src=0)
        index = int(chosen.item())
    return (found[index] if index >= 0 else None), notes


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


def write_rng(state: dict, path: Path) -> None:
    """The RNG states as safetensors (the torch and accelerator byte states, the Mersenne-Twister words of Python
    and NumPy) and JSON metadata (their scalars): data only, restored exactly by :func:`read_rng`."""
    from safetensors.torch import save_file

    version, words, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if "accelerator" in state:
        tensors["accelerator"] = state["accelerator"].cpu()
    meta = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached).hex()]}
    save_file(tensors, str(path), metadata={"graftr_rng": json.dumps(meta)})


def read_rng(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["graftr_rng"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        version, gauss = meta["python"]
        name, pos, has_gauss, cached = meta["numpy"]
        state = {"python": (version, tuple(int(w) for w in tensors["python"].tolist()), gauss),
                 "numpy": (name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, float.fromhex(cached)),
                 "torch": tensors["torch"]}
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
        raise GraftrError(f"{path} does not hold graftr's RNG states ({e})") from None
    if "accelerator" in tensors:
        state["accelerator"] = tensors["accelerator"]
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree(failure: str | None) -> str | None:
    """Every rank learns whether any rank failed (a collective: all ranks call it at the same point)."""
    import torch.distributed as dist

    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    if flag.item() and failure is None:
        return "another process could not write its part"
    return failure


def save(engine, directory: Path, step: int, meta: dict, *, keep: int) -> Path:
    """Save a checkpoint of ``engine`` after ``step`` (every rank calls this); returns ``directory/step-N``.

    A write that fails on any rank (a full disk) raises one :class:`GraftrError` on every rank, after removing
    ``step-N.tmp``: the checkpoints saved before are untouched."""
    import torch.distributed as dist

    rank = dist.get_rank()
    final, tmp = directory / _tag(step), directory / f"{_tag(step)}.tmp"
    failure = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a save of this step that a crash interrupted
                shutil.rmtree(tmp)
        except OSError as e:
            failure = f"{directory}: {e.strerror or e}"
    dist.barrier()
    if failure is None:
        try:
            # trainable parameters, optimizer, scheduler and ZeRO partitions; the frozen base comes from the model
            failures = getattr(getattr(engine, "checkpoint_engine", None), "failures", [])
            failures.clear()
            engine.save_checkpoint(str(directory), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
            if failures:
                failure = failures[0][1]  # "cannot write PATH: why"
            else:
                rng = tmp / f"rng_rank{rank}.safetensors"
                write_rng(rng_state(), rng.with_suffix(".part"))
                os.replace(rng.with_suffix(".part"), rng)
        except Exception as e:
            reason = write_failure(e, str(tmp))
            if reason is None:
                raise
            failure = reason
    failure = _agree(failure)  # every rank's files are in tmp, or some rank failed
    if rank == 0 and failure is None:
        try:
            record = {"step": step, "format_version": FORMAT_VERSION, **meta, "files": _listing(tmp)}
            write_text_atomically(tmp / META, json.dumps(record, indent=2) + "\n")
            for path in [*tmp.rglob("*"), tmp]:
                _fsync(path)
            stale = directory / f"{_tag(step)}.stale.tmp"
            if final.exists():  # one --resume skipped (it did not verify): replaced; a kill here leaves a .tmp
                os.rename(final, stale)
            os.rename(tmp, final)  # the checkpoint becomes visible complete, or not at all
            if stale.exists():
                shutil.rmtree(stale)
            write_text_atomically(directory / LATEST, final.name)
            _fsync(directory)
            for old in complete(directory)[:-keep]:
                shutil.rmtree(old)
        except OSError as e:
            failure = write_failure(e, str(tmp)) or f"{e}"
    failure = _agree(failure)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        done = complete(directory)
        if "no space left" in failure.lower():
            failure += f" ({space(directory, done)})"
        raise GraftrError(f"could not save the checkpoint of step {step}: {failure}; training stopped and "
                          f"{tmp} was removed" + (f", the checkpoints {', '.join(p.name for p in done)} are intact: "
                                                  "free space and --resume" if done else ""))
    return final


def space(directory: Path, done: list[Path]) -> str:
    """What a save needs and what it has: the size of the newest checkpoint in ``done`` (every save of a run writes
    as much) and the space free in ``directory`` (once the failed save's files are removed)."""
    from graftr.quantize import human_bytes

    free = free_space(directory)
    have = f"{human_bytes(free)} free in {directory}" if free is not None else \
        f"the free space of {directory} is unknown"
    if not done:
        return have
    needed = sum(p.stat().st_size for p in done[-1].rglob("*") if p.is_file())
    return f"a checkpoint takes {human_bytes(needed)}, {have}"


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
    rng = path / f"rng_rank{dist.get_rank()}.safetensors"
    if not rng.is_file():
        raise GraftrError(f"{path} has no {rng.name}: it was saved by fewer processes than are running now")
    set_rng_state(read_rng(rng))
