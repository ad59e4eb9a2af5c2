"""Pictures of training runs: train and eval loss (and eval accuracy where there is one) against the step.

``graftr train`` writes ``loss.png`` into its ``--out`` after every evaluation (the first at step 0, the base
model) and at the end; ``graftr plot RUN_DIR [RUN_DIR ...]`` draws several runs on one figure to compare them.
Both read the run's ``metrics.jsonl`` (:mod:`graftr.train.metrics`). The figure is drawn with matplotlib's Agg
canvas (no display, no pyplot state) and written atomically: a reader never sees half a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from graftr.errors import GraftrError, write_failure

PLOT = "loss.png"
METRICS = "metrics.jsonl"  # graftr.train.metrics.METRICS (not imported: that module loads rich and torch lazily)


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``eval`` records of ``run/metrics.jsonl``; a line cut short by a kill is skipped."""
    path = run / METRICS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise GraftrError(f"{run} is not a graftr run directory: {path.name} is missing") from None
    except OSError as e:
        raise GraftrError(f"cannot read {path}: {e}") from None
    train, evals = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            (train if record.get("kind") == "train" else evals if record.get("kind") == "eval" else []).append(record)
    return train, evals


HELD_OUT = ("accuracy", "exact_match")  # held-out metrics an eval record may carry besides the loss


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def draw(runs: list[tuple[str, Path]], out: Path, title: str | None = None) -> Path:
    """Draw the runs (label, run directory) on one figure and write it to ``out`` (PNG) atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = [(label, *read_metrics(run)) for label, run in runs]
    # the held-out metric beside the loss: a classifier's or a choice set's accuracy, or exact match
    metric = next((key for key in HELD_OUT if any(_series(evals, key)[0] for _, _, evals in data)), None)
    accuracy = metric is not None
    figure = Figure(figsize=(11 if accuracy else 7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    loss_ax = axes[0]
    colours = [f"C{i % 10}" for i in range(len(data))]
    for colour, (label, train, evals) in zip(colours, data):
        prefix = f"{label}: " if len(data) > 1 else ""
        steps, values = _series(train, "loss")
        if steps:
            loss_ax.plot(steps, values, color=colour, marker="." if len(steps) < 30 else None,  # a point shows
                         label=f"{prefix}train loss")
        steps, values = _series(evals, "loss")
        if steps:
            loss_ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=4,
                         label=f"{prefix}eval loss")
        if accuracy:
            steps, values = _series(evals, metric)
            if steps:
                axes[1].plot(steps, values, color=colour, marker="o", markersize=4,
                             label=f"{prefix}eval {metric.replace('_', ' ')}")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    if accuracy:
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(metric.replace("_", " "))
        axes[1].set_title(f"eval {metric.replace('_', ' ')}")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    figure.suptitle(title or ", ".join(label for label, _ in runs))
    return save_png(figure, out)


def save_png(figure, out: Path) -> Path:
    """Write a matplotlib figure to ``out`` as PNG through a temporary sibling renamed over it (never half a file);
    a failed write (a full disk) is one :class:`GraftrError` and leaves ``out`` as it was."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    except Exception as e:
        reason = write_failure(e, str(out))
        if reason is None:
            raise
        raise GraftrError(f"{reason}; {out} is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def plot_run(run: Path, title: str | None = None) -> Path:
    """``run/loss.png`` from ``run/metrics.jsonl`` (what ``graftr train`` calls after each evaluation)."""
    return draw([(run.name, run)], run / PLOT, title)


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories of graftr train (each holds metrics.jsonl)")
    parser.add_argument("--out", help=f"the PNG to write (default: RUN_DIR/{PLOT} for one run, runs.png in the "
                                      "current directory for several)")
    parser.add_argument("--title", help="the figure's title (default: the run directories' names)")


def main(args) -> int:
    from graftr.console import console

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise GraftrError(f"{run} is not a directory (give graftr train's --out directories)")
    labels = [run.name or str(run) for run in runs]
    if len(set(labels)) < len(labels):  # runs/a/demo and runs/b/demo: label them by their whole path
        labels = [str(run) for run in runs]
    target = Path(args.out) if args.out else (runs[0] / PLOT if len(runs) == 1 else Path("runs.png"))
    if target.suffix.lower() != ".png":
        raise GraftrError(f"--out {target}: graftr plot writes PNG files; name it *.png")
    draw(list(zip(labels, runs)), target, args.title)
    console.print(f"wrote {target}")
    return 0
