"""What every directory graftr writes or reads shares: the atomic writers, the JSON reader, the tensor-fit report.

* :func:`write_dir_atomically` — a directory is written into a temporary sibling, fsynced and renamed into place,
  so a crash never leaves it half-written and never destroys the previous one (adapters, PEFT exports, merged
  models); :func:`write_text_atomically` does the same for one file (``latest``, a JSON Schema).
* :func:`read_json_object` — a JSON file that must hold an object, with one error line when it does not.
* :func:`check_fit` — the report of the tensors a file holds against the ones a model expects: every missing,
  unexpected and mis-shaped name, three of each shown; :func:`real_tensors` refuses tensors without data.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from graftr.errors import AdapterLoadError, GraftrError


def write_dir_atomically(out: Path, write: Callable[[Path], None], *, marker: str) -> None:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``out``, replacing ``out`` only if it holds ``marker``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise GraftrError(f"{out} exists and is not a graftr output directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced ``<name>.tmp`` sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json_object(file: Path, *, error: type[GraftrError] = AdapterLoadError) -> dict:
    """The JSON object in ``file`` (which the caller has checked exists); ``error`` says what is wrong with it."""
    try:
        data = json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object")
    return data


def check_fit(expected: dict[str, tuple], given: dict[str, tuple], *, where: str, target: str,
              shown: dict[str, str] | None = None) -> None:
    """Raise :class:`AdapterLoadError` unless ``given`` (name → shape) has exactly the names of ``expected``, each
    with its shape: ``"<where> does not fit <target>: 2 missing: a, b; 1 wrong shape: c (3,) vs (4,)"``.

    Shapes are compared in ``expected``'s order; ``shown`` maps a name to the one to print (a file's own key)."""
    shown = shown or {}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(shown.get(k, k) for k in set(given) - set(expected))
    shapes = [f"{shown.get(k, k)} {tuple(given[k])} vs {tuple(shape)}" for k, shape in expected.items()
              if k in given and tuple(given[k]) != tuple(shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise AdapterLoadError(f"{where} does not fit {target}: " + "; ".join(problems))


def real_tensors(state: dict[str, torch.Tensor], refusal: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copies of ``state`` to write; a tensor on ``meta`` (no data) raises
    :class:`GraftrError` with ``refusal(its name)``."""
    on_meta = [n for n, t in state.items() if t.is_meta]
    if on_meta:
        raise GraftrError(refusal(on_meta[0]))
    return {n: t.detach().to("cpu").contiguous() for n, t in state.items()}
