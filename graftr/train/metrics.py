"""What a training run shows and records (rank 0 only): a rich progress bar, log lines, ``metrics.jsonl``,
TensorBoard event files when ``tensorboard`` is installed, and the final summary table.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "epoch", "loss", "lr",
"grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`` every ``log_every`` steps (the loss is the mean over those
steps, processes and micro-batches) and ``{"kind": "eval", "step", "loss", "accuracy" | "perplexity"}`` after each
evaluation (a language model's eval adds its held-out answer metric, ``accuracy`` or ``exact_match``, when the data
has one: ``train.data.eval_metric``). A resumed run first drops the records after its checkpoint's step, so the file reads like one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from graftr.errors import GraftrError

METRICS = "metrics.jsonl"
# what an evaluation records: the loss; a classifier's accuracy or an LM's perplexity; a held-out answer metric
EVAL_KEYS = ("loss", "accuracy", "perplexity", "exact_match")


class Recorder:
    """Appends records to ``metrics.jsonl`` and, when ``tensorboard`` is installed, to TensorBoard."""

    def __init__(self, out: Path, *, resume_step: int, console=None):
        self.path = out / METRICS
        if self.path.exists():  # keep what the checkpoint's run had logged up to its step, drop the rest
            kept, torn = read_records(self.path, until=resume_step)
            if torn and console is not None:
                console.print(f"[yellow]note:[/] {self.path}:{torn}: dropped a torn last line (a run stopped while "
                              "writing it)")
            _replace(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise GraftrError(f"cannot write {self.path}: {e.strerror or e}") from None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            self.writer = None
        else:  # purge_step drops events a killed run wrote after the checkpoint
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: the line may be torn, which the next --resume drops
            raise GraftrError(f"cannot write {self.path}: {e.strerror or e}; the run stopped at step "
                              f"{record['step']}, --resume continues from its newest checkpoint") from None
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # write() reported it
        if self.writer is not None:
            self.writer.close()


def read_records(path: Path, *, until: int | None = None) -> tuple[list[dict], int | None]:
    """The records of ``metrics.jsonl`` (those up to step ``until``) and the line number of a torn last line that
    was dropped (a kill mid-write), or None. Any other line that is not a record is a :class:`GraftrError`
    naming its file and line."""
    lines = path.read_bytes().split(b"\n")
    records, torn = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record")
        except (ValueError, UnicodeDecodeError) as e:
            if number == len(lines):  # the last line, without its newline: a write cut short
                torn = number
                break
            raise GraftrError(f"{path}:{number}: {e}; the metrics log is damaged (move it away to resume)") from None
        if until is None or record["step"] <= until:
            records.append(record)
    return records, torn


def _replace(path: Path, text: str) -> None:
    """Rewrite ``path`` through a fsynced temporary file: a kill leaves the old log or the new one, never none."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GraftrError(f"cannot write {path}: {e.strerror or e}") from None


def progress_bar(console: Console) -> Progress:
    """``step 40/60 ━━━━━━━╸━━━ loss 0.4312 lr 2.1e-03 1,830 tok/s 0:00:21 <0:00:09``."""
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                    TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TextColumn("<"),
                    TimeRemainingColumn(), console=console, transient=False)


def eval_text(metrics: dict[str, float]) -> str:
    """``loss 0.4127 accuracy 0.8300``, ``loss 2.1034 perplexity 8.19`` or ``... exact_match 0.7400``."""
    keys = [k for k in EVAL_KEYS if k in metrics]
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def summary_table(rows: list[tuple[str, str]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("", justify="right")
    table.show_header = False
    for name, value in rows:
        table.add_row(name, value)
    return table
