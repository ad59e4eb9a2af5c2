"""Opening a safetensors file (a base checkpoint's shard or an adapter's tensors) with a damaged file as one error.

Kept outside :mod:`graftr.formats` so that :mod:`graftr.materialize`, which the adapter formats use, can read base
checkpoints without importing the formats package (no import cycle).
"""

from __future__ import annotations

from contextlib import contextmanager

from safetensors import SafetensorError, safe_open

from graftr.errors import AdapterLoadError, GraftrError


@contextmanager
def open_safetensors(path, *, error: type[GraftrError] = AdapterLoadError):
    """``safe_open`` of a safetensors file (base checkpoint or adapter) with a damaged file as one ``error``: a
    header too small or too large, a header that is not JSON, data shorter than the header says."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise error(f"{path} is not a readable safetensors file: {str(e).strip().splitlines()[0]}") from None
    with handle as f:
        yield f
