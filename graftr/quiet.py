"""What the libraries under graftr print that a graftr user does not need, and how it is kept off the screen.

``graftr`` reports what matters itself (the plan, notes, the progress bar, the summary, one-line errors). The
libraries it drives print on every run, on every rank: DeepSpeed's accelerator probe and INFO/WARNING log lines,
torch's ``FutureWarning``\\ s from the distributed calls DeepSpeed makes (``all_gather_into_tensor``...), the
"Generating train split" bars of ``datasets``, transformers' LOAD REPORT (which calls the classifier graftr loads
from the adapter MISSING), c10's ``[W ...]`` lines. :func:`quiet` switches those off before any of the libraries
is imported (environment variables, which the ranks of ``--nproc`` inherit, logging filters and warning filters);
``graftr --verbose`` (or ``GRAFTR_VERBOSE=1``) leaves everything on. Errors are never hidden.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "GRAFTR_VERBOSE"

# environment read by the libraries when they are imported (set only if the user has not set them)
_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # the LOAD REPORT and other advice written as logger warnings
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split", "Map", ...
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10 / gloo "[W ...]" lines
}
# loggers whose records below ERROR graftr drops (DeepSpeed writes to stdout through its own handler)
_LOGGERS = ("DeepSpeed", "torch.distributed", "torch._dynamo", "torch._inductor")
# warnings raised inside the libraries while graftr drives them: (category, module regex of where it is attributed)
_WARNINGS = ((FutureWarning, r"(torch|deepspeed|transformers|datasets)(\.|$)"),
             (UserWarning, r"(torch|deepspeed|transformers|datasets|pydantic)(\.|$)"),
             (DeprecationWarning, r"(torch|deepspeed|transformers|datasets)(\.|$)"))


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet(verbose: bool = False) -> None:
    """Hide the libraries' noise for the rest of this process and the processes it starts (unless ``verbose``)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # the ranks of --nproc are verbose too
        return
    if is_verbose():
        return
    for name, value in _ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BelowError) for f in logger.filters):
            logger.addFilter(_BelowError())
    for category, module in _WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
