"""User-facing errors.

Every failure caused by user input (a bad recipe, a model id that cannot be resolved, an adapter that does not
fit the model) is raised as a :class:`GraftrError`. The CLI prints its message on one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""

import os


class GraftrError(Exception):
    """An error caused by user input; its message is shown to the user as is."""


class RecipeError(GraftrError):
    """A recipe failed to load or validate. The message lists every problem with file, line and field."""


class MatchError(GraftrError):
    """A rule matched no site, or matched a site its adapter kind cannot attach to."""


class LayerCountError(MatchError):
    """A rule's ``layers`` asks for more layers than a stack has (the match pass adds the relative form as the fix)."""


class MergeError(GraftrError):
    """An adapter cannot be folded into the base weights (the message says why)."""


# why no attention kind merges: said by the early check (graftr merge) and by GraftedModel.merge_ alike
ATTENTION_NOT_MERGEABLE = "attention adapters cannot be merged into weights; they add computation of their own"


class AdapterLoadError(GraftrError):
    """A saved adapter does not fit the model (missing, extra or mis-shaped tensors, different base)."""


# what torch.save's zip writer raises when a write fails: "[enforce fail at inline_container.cc:672] . unexpected pos
# 704 vs 598" (a full disk: the stream stopped short), or "PytorchStreamWriter failed writing file ..."
_TORCH_WRITER = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def write_failure(error: BaseException, path: str) -> str | None:
    """The one-line reason a write of ``path`` failed (a full disk, a read-only or missing directory), or None when
    ``error`` is not a write failure (a bug, which keeps its traceback).

    Writers report the same errno differently: Python raises ``OSError``; safetensors a ``SafetensorError`` with
    "No space left on device (os error 28)"; torch.save a ``RuntimeError`` "[enforce fail at inline_container.cc]
    ... unexpected pos ..." (:data:`_TORCH_WRITER`), which says nothing of the cause, so the free space decides."""
    if isinstance(error, OSError):
        return f"cannot write {error.filename or path}: {error.strerror or error}"
    text = str(error)
    if "os error" in text or "No space left" in text:
        return f"cannot write {path}: {text.strip().splitlines()[0]}"
    if isinstance(error, RuntimeError) and any(sign in text for sign in _TORCH_WRITER):
        free = free_space(path)
        cause = "no space left on device" if free is not None and free < 1 << 20 else "the write failed"
        return f"cannot write {path}: {cause}"
    return None


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free on the filesystem of ``path`` (or of its nearest existing parent); None if that cannot be read."""
    import shutil

    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
