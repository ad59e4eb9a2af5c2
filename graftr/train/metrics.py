"""What a training run shows and records (rank 0 only): a rich progress bar, log lines, ``metrics.jsonl``,
TensorBoard event files when ``tensorboard`` is installed, and the final summary table.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "epoch", "loss", "lr",
"grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`` every ``log_every`` steps (the loss is the mean over those
steps, processes and micro-batches) and ``{"kind": "eval", "step", "loss", "accuracy" | "perplexity"}`` after each
evaluation. A resumed run first drops the records after its checkpoint's step, so the file reads like one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

METRICS = "metrics.jsonl"


class Recorder:
    """Appends records to ``metrics.jsonl`` and, when ``tensorboard`` is installed, to TensorBoard."""

    def __init__(self, out: Path, *, resume_step: int):
        self.path = out / METRICS
        if self.path.exists():  # keep what the checkpoint's run had logged up to its step, drop the rest
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            self.writer = None
        else:  # purge_step drops events a killed run wrote after the checkpoint
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def progress_bar(console: Console) -> Progress:
    """``step 40/60 ━━━━━━━╸━━━ loss 0.4312 lr 2.1e-03 1,830 tok/s 0:00:21 <0:00:09``."""
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                    TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TextColumn("<"),
                    TimeRemainingColumn(), console=console, transient=False)


def eval_text(metrics: dict[str, float]) -> str:
    """``loss 0.4127 accuracy 0.8300`` or ``loss 2.1034 perplexity 8.19``."""
    keys = [k for k in ("loss", "accuracy", "perplexity") if k in metrics]
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def summary_table(rows: list[tuple[str, str]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("", justify="right")
    table.show_header = False
    for name, value in rows:
        table.add_row(name, value)
    return table
