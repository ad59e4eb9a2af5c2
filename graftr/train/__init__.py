"""``graftr train``: train a recipe's adapters with DeepSpeed ZeRO, on one process or many.

* :mod:`graftr.train.config` — :class:`~graftr.train.config.TrainConfig` (the recipe's ``train:`` section) and the
  DeepSpeed config built from it;
* :mod:`graftr.train.loop` — :func:`~graftr.train.loop.train`: named set-up steps, then the loop (imports DeepSpeed);
* :mod:`graftr.train.distributed` — the process group (launcher's or one of one), full tensors from ZeRO partitions;
* :mod:`graftr.train.checkpoint` — atomic DeepSpeed checkpoints with RNG states, exact resume;
* :mod:`graftr.train.metrics` — progress bar, ``metrics.jsonl``, TensorBoard, the final summary;
* :mod:`graftr.train.command` — the command line (``add_arguments``/``main``) and the ``--nproc`` relaunch.

:mod:`graftr.recipe` imports :mod:`graftr.train.config` (for ``TrainConfig``), so this package imports nothing
itself, and nothing in it imports DeepSpeed or the recipe module at import time.
"""
