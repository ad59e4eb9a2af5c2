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
from typing import TYPE_CHECKING, Callable

from safetensors import SafetensorError

from graftr.errors import AdapterLoadError, GraftrError, write_failure
from graftr.tensorfile import open_safetensors  # noqa: F401  (re-exported: the formats read adapters with it)

if TYPE_CHECKING:  # torch-free at import: `graftr schema` writes its file with these writers
    import torch


def check_out(out: Path, marker: str, *, force: bool) -> None:
    """What :func:`write_dir_atomically` would refuse, checked before any work (``--out`` of merge/export/apply)."""
    write_dir_atomically(Path(out), None, marker=marker, force=force, check_only=True)


def write_dir_atomically(out: Path, write, *, marker: str, force: bool = False,
                         check_only: bool = False) -> None:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``out``.

    An existing non-empty ``out`` is replaced only with ``force`` and only if it holds ``marker`` (an earlier output
    of the same kind); otherwise nothing is written and the error says what is there. A failed write (a full disk)
    removes the temporary directory and is one :class:`GraftrError`; ``out`` is then unchanged."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GraftrError(f"{out} exists and is a file; refusing to replace it")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        shown = ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" if len(entries) > 3 else "")
        if not (out / marker).exists():
            raise GraftrError(f"{out} exists and is not a graftr output directory (it holds {shown}); refusing to "
                              "replace it")
        if not force:
            raise GraftrError(f"{out} exists and holds {len(entries)} files ({shown}); pass --force to replace it")
    if check_only:
        return
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(e, str(tmp)) if isinstance(e, Exception) else None
        if reason is None:
            raise
        raise GraftrError(f"{reason}; {out} is unchanged") from None


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced ``<name>.tmp`` sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file, and no temporary one
        raise


def read_json_object(file: Path, *, error: type[GraftrError] = AdapterLoadError) -> dict:
    """The JSON object in ``file`` (which the caller has checked exists); ``error`` says what is wrong with it."""
    try:
        data = json.loads(Path(file).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_safetensors(path, *, error: type[GraftrError] = AdapterLoadError) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, a damaged file being one ``error`` (:func:`open_safetensors`)."""
    with open_safetensors(path, error=error) as f:
        try:
            return {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise error(f"{path} is not a readable safetensors file: {str(e).strip().splitlines()[0]}") from None


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
