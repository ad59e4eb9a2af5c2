"""``graftr train``: train a recipe's adapters with DeepSpeed ZeRO, on one process or many.

* :mod:`graftr.train.config` — :class:`TrainConfig` (the recipe's ``train:`` section), the DeepSpeed config built
  from it, ``path.to.field=value`` overrides;
* :mod:`graftr.train.loop` — :func:`~graftr.train.loop.train`, the training loop (imports DeepSpeed);
* :mod:`graftr.train.checkpoint` — atomic DeepSpeed checkpoints with RNG states, exact resume;
* :mod:`graftr.train.metrics` — progress bar, ``metrics.jsonl``, TensorBoard, the final summary;
* :mod:`graftr.train.command` — the command line (``add_arguments``/``main``) and the ``--nproc`` relaunch.

This package is imported by :mod:`graftr.recipe` (for :class:`TrainConfig`), so nothing here imports DeepSpeed or
the recipe module at import time.
"""

from graftr.train.command import add_arguments, main
from graftr.train.config import TrainConfig

__all__ = ["TrainConfig", "add_arguments", "main"]
