"""``graftr compare SPEC [--out DIR] [--seeds 0,1,2] [--only NAME,...] [train.KEY=VALUE ...]``: several adapter
methods — graftr recipes and PEFT baselines — trained on the same model, data, step budget, schedule and seeds,
then compared on held-out quality, speed, memory and size.

A comparison is a YAML file (``comparisons/`` holds the shipped ones; each opens with the command that runs it)::

    name: smollm2_sentiment
    model: smollm2
    data: data/sentiment_instruct
    seeds: [0, 1, 2]
    train: {max_steps: 40, eval_every: 10}       # every method, on top of its recipe's train: section
    methods:
      - {name: graftr IA3, family: IA3, recipe: ../recipes/ia3_llama.yaml}
      - {name: PEFT IA3, family: IA3, peft: {peft_type: IA3, target_modules: [k_proj, v_proj, down_proj],
                                              feedforward_modules: [down_proj]}}

Every run is one training process of its own (its peak memory is its own): a graftr method runs ``graftr train``
itself (the product path, every recipe setting as a user gets it); a PEFT method runs graftr's same loop with the
HF model wrapped by ``peft.get_peft_model`` (:mod:`graftr.baselines`): the same tokenized data, batches, order,
optimizer, schedule, clipping, loss definition and evaluation (no sample answers: ``train.samples`` is 0 unless
the spec sets it). A PEFT method trains with the resolved ``train:``
settings of its family's graftr method (its lr, schedule, warmup, weight decay), so the two differ only in their
implementation; its own ``train:`` changes them, and is required where the family has no graftr method.

Per method, over the seeds: the held-out metric (``train.data.eval_metric``: accuracy by answer likelihood or
exact match; a classifier's accuracy; else the eval loss) as mean ± std, the eval loss, trainable parameters, the
median step time and tokens/s (steps after the first), peak memory (the training process's, above its start),
and the adapter's size on disk. Methods are grouped by ``family``; a family with methods on one side only says
so. Written to ``DIR``: ``results.json`` (every run and the summaries), ``results.md`` (the table and the
command), ``curves.png`` (every method's held-out metric against the step, mean and range over the seeds) and
each run's own directory (``runs/<method>/seed<k>/``: metrics, adapter). Run the same command again to continue
an interrupted comparison: finished runs are kept, an unfinished one is run again.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from graftr.configmodel import ConfigModel
from graftr.errors import GraftrError

SPEC_FILE = "comparison.json"  # in --out: the resolved comparison it holds (a marker, and what a rerun must match)
SUMMARY = "summary.json"  # in a run's directory: its summary, written last (a finished run)
HELD_OUT = ("accuracy", "exact_match")  # metrics an eval record may carry; higher is better


class Method(ConfigModel):
    """One method of a comparison: a graftr recipe, or a PEFT config trained by graftr's loop."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="shown in the table; its directory is this name in lowercase ASCII, "
                                                "every run of other characters replaced by '-'")
    family: str = Field(min_length=1, description="methods of one family are compared side by side "
                                                  "(a graftr method and its PEFT counterpart)")
    recipe: str | dict | None = Field(None, description="a graftr recipe: a path (relative to the comparison "
                                                        "file) or the recipe itself as a mapping")
    overrides: list[str] = Field([], description="recipe overrides path.to.field=value, e.g. "
                                                 "rules.0.adapter.inhibition=0")
    peft: dict | None = Field(None, description="a PEFT config (adapter_config.json's fields, peft_type included)")
    train: dict = Field({}, description="train: fields for this method alone, over the shared ones")

    @model_validator(mode="after")
    def _one_side(self) -> Method:
        if (self.recipe is None) == (self.peft is None):
            raise ValueError("a method has either a recipe (graftr) or a peft config (a PEFT baseline)")
        if self.peft is not None and self.overrides:
            raise ValueError("overrides apply to a recipe; a PEFT method sets its train: fields under train:")
        if self.peft is not None and not isinstance(self.peft.get("peft_type"), str):
            raise ValueError("peft needs its peft_type (IA3, LORA, ADAPTION_PROMPT, PREFIX_TUNING, PROMPT_TUNING, ...)")
        return self

    @property
    def side(self) -> str:
        return "graftr" if self.recipe is not None else "PEFT"

    @property
    def slug(self) -> str:
        import unicodedata

        plain = unicodedata.normalize("NFKD", self.name).lower()  # IA³ -> ia3
        return re.sub(r"[^a-z0-9]+", "-", plain).strip("-") or "method"


class Comparison(ConfigModel):
    """A comparison file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str = Field(min_length=1, description="what --model takes: a hub id, a directory, a GGUF file")
    data: str = Field(min_length=1, description="what --data takes (relative to the comparison file if it exists "
                                                "there, else to the working directory)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="train.seed of each repetition")
    train: dict = Field({}, description="train: fields for every method (the same steps, batch, evaluation)")
    methods: list[Method] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: list[Method]) -> list[Method]:
        for attr in ("name", "slug"):
            seen = [getattr(m, attr) for m in methods]
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"method {attr}s must differ: {', '.join(twice)}")
        return methods

    @model_validator(mode="after")
    def _peft_lr(self) -> Comparison:
        graftr_families = {m.family for m in self.methods if m.side == "graftr"}
        for m in self.methods:
            if m.side == "PEFT" and m.family not in graftr_families and "lr" not in {**self.train, **m.train}:
                raise ValueError(f"method {m.name!r}: its family {m.family!r} has no graftr method to take the "
                                 "train settings from; set train: {lr: ...} on it")
        return self


def load(path: str | Path, overrides: list[str] = ()) -> tuple[Comparison, Path]:
    """Read and validate a comparison file (``train.KEY=VALUE`` overrides go into its shared ``train:``); returns
    it and the folder its relative paths start from."""
    from graftr.recipe import apply_override, load_yaml, parse_override, read_recipe_text

    path = Path(path)
    text = read_recipe_text(path)
    try:
        data = load_yaml(text)
    except Exception as e:  # noqa: BLE001 -- yaml's errors: one line
        raise GraftrError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GraftrError(f"{path}: a comparison is a mapping with name, model, data and methods")
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] != "train" or len(keys) < 2:
            raise GraftrError(f"override {item!r}: graftr compare takes train.KEY=VALUE overrides (every method)")
        data.setdefault("train", {})
        apply_override(data, keys, value, item)
    try:
        spec = Comparison.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or '(top)'}: {p['msg']}" for p in e.errors())
        raise GraftrError(f"{path}: {problems}") from None
    return spec, path.parent


# ---- running ---------------------------------------------------------------------------------------------------
def _train_overrides(fields: dict, prefix: str = "train") -> list[str]:
    """``{"max_steps": 40, "data": {"max_length": 96}}`` → ``["train.max_steps=40", "train.data.max_length=96"]``."""
    out = []
    for key, value in fields.items():
        if isinstance(value, dict):
            out += _train_overrides(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def _resolve(base: Path, value: str) -> str:
    """A path of the comparison file, relative to its folder if it exists there."""
    candidate = base / value
    return str(candidate) if candidate.exists() else value


class Runner:
    """Runs a comparison's (method, seed) runs in their own processes, each once, in ``out/runs``."""

    def __init__(self, spec: Comparison, base: Path, out: Path, console, *, verbose: bool = False):
        self.spec, self.base, self.out, self.console, self.verbose = spec, base, out, console, verbose
        self.data = _resolve(base, spec.data)

    def directory(self, method: Method, seed: int) -> Path:
        return self.out / "runs" / method.slug / f"seed{seed}"

    def finished(self, method: Method, seed: int) -> dict | None:
        path = self.directory(method, seed) / SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, method: Method, seed: int) -> dict:
        """Train ``method`` with ``seed`` unless a finished run is there; returns its summary."""
        done = self.finished(method, seed)
        if done is not None:
            return done
        where = self.directory(method, seed)
        if where.exists():  # a run stopped before its summary: start it again
            shutil.rmtree(where)
        where.mkdir(parents=True)
        # no sample answers before and after (train.samples): the comparison shows none, and they cost each run
        # two generations (SmolLM2: ~10 s a run on one core); a spec or method that wants them sets them
        shared = {"samples": 0, **self.spec.train, **method.train, "seed": seed, "log_every": 1}
        if method.side == "graftr":
            command = self._graftr_command(method, where, shared)
        else:
            command = self._peft_command(method, where, seed, shared)
        started = time.perf_counter()
        log = where / "log.txt"
        with open(log, "w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=self._env()).returncode
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise GraftrError(f"{method.name} (seed {seed}) failed: {tail[0]} (log: {log})")
        summary = _read_summary(where / "run", method.side)
        summary.update(method=method.name, family=method.family, side=method.side, seed=seed,
                       wall_seconds=time.perf_counter() - started, adapter_bytes=_adapter_bytes(where / "run"))
        (where / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def _env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def _graftr_command(self, method: Method, where: Path, shared: dict) -> list[str]:
        recipe = method.recipe
        if isinstance(recipe, dict):
            import yaml

            path = where / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        else:
            path = Path(_resolve(self.base, recipe))
        return [sys.executable, "-m", "graftr.cli", "train", str(path), "--model", self.spec.model, "--data",
                self.data, "--out", str(where / "run"), *method.overrides, *_train_overrides(shared)]

    def _peft_command(self, method: Method, where: Path, seed: int, shared: dict) -> list[str]:
        """``python -m graftr.compare run SPEC``, the baseline's spec holding its family's resolved train settings."""
        train = self._family_train(method, seed)
        for key, value in shared.items():  # the comparison's and the method's own settings win
            if isinstance(value, dict) and isinstance(train.get(key), dict):
                train[key] = {**train[key], **value}
            else:
                train[key] = value
        baseline = {"name": method.slug, "peft": method.peft, "train": train, "model": self.spec.model,
                    "data": self.data, "out": str(where / "run"), **self._head(method, seed)}
        path = where / "baseline.json"
        path.write_text(json.dumps(baseline, indent=2) + "\n")
        return [sys.executable, "-m", "graftr.compare", "run", str(path)]

    def _resolved_recipe(self, method: Method, seed: int) -> dict:
        """The recipe a graftr method's run with ``seed`` resolved (its ``adapter/recipe.yaml``; the run goes first)."""
        from graftr.recipe import load_yaml

        self.run(method, seed)
        return load_yaml((self.directory(method, seed) / "run" / "adapter" / "recipe.yaml").read_text())

    def _head(self, method: Method, seed: int) -> dict:
        """The task and label count the graftr methods train the model for (the family's, else the first graftr
        method's), so a PEFT baseline gets the same head: e.g. a new two-class classifier on an encoder, which the
        model's own task (masked LM) would not have."""
        graftr_methods = [m for m in self.spec.methods if m.side == "graftr"]
        chosen = next((m for m in graftr_methods if m.family == method.family), graftr_methods[0] if graftr_methods
                      else None)
        if chosen is None:
            return {}
        recipe = self._resolved_recipe(chosen, seed)
        return {key: recipe[key] for key in ("task", "num_labels") if recipe.get(key) is not None}

    def _family_train(self, method: Method, seed: int) -> dict:
        """The resolved train: section of the family's graftr method (its run with this seed, run first)."""
        graftr_method = next((m for m in self.spec.methods if m.family == method.family and m.side == "graftr"), None)
        if graftr_method is None:
            return {}
        train = dict(self._resolved_recipe(graftr_method, seed).get("train") or {})
        if train.get("warmup_ratio") is not None:  # resolved with both written out; the ratio is what was set
            train.pop("warmup_steps", None)
        return train


def _read_summary(run: Path, side: str) -> dict:
    """The training summary a run wrote beside its adapter, with its eval records and per-step times."""
    from graftr.train.metrics import read_records

    file = run / "adapter" / ("manifest.json" if side == "graftr" else "training.json")
    training = json.loads(file.read_text())["training"]
    records, _ = read_records(run / "metrics.jsonl")
    training["evals"] = [r for r in records if r.get("kind") == "eval"]
    training["step_times"] = [r["step_s"] for r in records if r.get("kind") == "train" and r.get("step_s")]
    return training


def _adapter_bytes(run: Path) -> int:
    """Bytes of the adapter's tensor file(s) (graftr's adapter.safetensors, PEFT's adapter_model.safetensors)."""
    return sum(f.stat().st_size for f in (run / "adapter").glob("*.safetensors"))


# ---- summarizing -----------------------------------------------------------------------------------------------
def metric_of(evals: list[dict]) -> str:
    """The held-out metric of a run's eval records: accuracy or exact match where present, else the loss."""
    last = evals[-1] if evals else {}
    return next((k for k in HELD_OUT if k in last), "loss")


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(spec: Comparison, runs: list[dict]) -> list[dict]:
    """One row per method (in the comparison's order): its numbers over its seeds."""
    rows = []
    for method in spec.methods:
        mine = [r for r in runs if r["method"] == method.name]
        if not mine:
            continue
        metric = metric_of(mine[0]["evals"])
        finals = [r["evals"][-1] for r in mine if r["evals"]]
        steps = [t for r in mine for t in r["step_times"]]
        step_time = statistics.median(steps) if steps else math.nan
        tokens = statistics.fmean(r["tokens_per_s"] for r in mine)
        rows.append({
            "method": method.name, "family": method.family, "side": method.side, "seeds": [r["seed"] for r in mine],
            "metric": metric, "held_out": _mean_std([f[metric] for f in finals]),
            "before": statistics.fmean(r["evals"][0][metric] for r in mine) if mine[0]["evals"] else math.nan,
            "eval_loss": _mean_std([f["loss"] for f in finals]), "trainable": mine[0]["trainable_params"],
            "step_s": step_time, "tokens_per_s": tokens,
            "peak_memory": statistics.fmean(max(r["peak_memory"]) for r in mine),
            "adapter_bytes": mine[0]["adapter_bytes"],
            "curve": _curve(mine, metric),
        })
    return rows


def _curve(runs: list[dict], metric: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of ``metric`` over the runs, at the steps every run evaluated."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for e in r["evals"]:
            if metric in e:
                by_step.setdefault(e["step"], []).append(e[metric])
    return [(step, statistics.fmean(v), min(v), max(v)) for step, v in sorted(by_step.items()) if len(v) == len(runs)]


def _fmt(mean_std: tuple[float, float], digits: int = 3) -> str:
    mean, std = mean_std
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


COLUMNS = ("family", "method", "held-out", "eval loss", "trainable", "s/step", "tokens/s", "peak memory",
           "adapter")


def table_rows(spec: Comparison, rows: list[dict]) -> list[tuple[str, ...]]:
    """The table's rows, grouped by family (in the order families first appear); a family with methods on one side
    only gets a row saying the other side has none."""
    out = []
    families = list(dict.fromkeys(m.family for m in spec.methods))
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        for r in mine:
            out.append((family, f"{r['method']} ({r['side']})",
                        f"{r['metric'].replace('_', ' ')} {_fmt(r['held_out'])} (from {r['before']:.3f})",
                        _fmt(r["eval_loss"]), f"{r['trainable']:,}", f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                        _size(r["peak_memory"]), _size(r["adapter_bytes"])))
        sides = {m.side for m in spec.methods if m.family == family}
        for missing in sorted({"graftr", "PEFT"} - sides):
            out.append((family, f"— ({missing} has no counterpart)", *["—"] * (len(COLUMNS) - 2)))
    return out


def markdown(spec: Comparison, rows: list[dict], command: str, meta: dict) -> str:
    lines = [f"# {spec.name}", "", f"```bash\n{command}\n```", "",
             f"{spec.model} on {spec.data}; seeds {', '.join(map(str, spec.seeds))}; {meta['machine']}; "
             f"held-out metric after the last step, mean ± std over the seeds (before training in brackets).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(spec, rows)]
    return "\n".join(lines) + "\n"


def draw(spec: Comparison, rows: list[dict], out: Path) -> Path:
    """Every method's held-out metric against the step (mean over the seeds, the range shaded): ``curves.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    families = list(dict.fromkeys(m.family for m in spec.methods))
    for index, r in enumerate(rows):
        colour = f"C{index % 10}"
        steps = [c[0] for c in r["curve"]]
        if not steps:
            continue
        style = "-" if r["side"] == "graftr" else "--"
        ax.plot(steps, [c[1] for c in r["curve"]], style, color=colour, marker="o", markersize=3,
                label=f"{r['method']} ({r['family']})")
        ax.fill_between(steps, [c[2] for c in r["curve"]], [c[3] for c in r["curve"]], color=colour, alpha=0.12)
    metric = rows[0]["metric"] if rows else "loss"
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {metric.replace('_', ' ')}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if len(rows) > 6 else 1)
    ax.set_title(f"{spec.name}: {spec.model}\n{len(families)} famil{'y' if len(families) == 1 else 'ies'}, "
                 f"{len(spec.seeds)} seed(s); mean and range over the seeds (solid: graftr, dashed: PEFT)",
                 fontsize="medium")
    from graftr.plot import save_png

    return save_png(figure, out)


# ---- the command -----------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("spec", help="the comparison YAML (comparisons/*.yaml)")
    parser.add_argument("--out", help="output directory (default: runs/compare-<name>); run again to continue it")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the file's (e.g. 0 for a quick look)")
    parser.add_argument("--only", help="comma-separated method names to run (the others are left out)")
    parser.add_argument("overrides", nargs="*", metavar="train.KEY=VALUE",
                        help="train: fields for every method, e.g. train.max_steps=10")
    from graftr.cliargs import collect_overrides

    collect_overrides(parser)  # the overrides may follow --seeds/--only/--out too


def _select(spec: Comparison, seeds: str | None, only: str | None) -> Comparison:
    update: dict[str, Any] = {}
    if seeds is not None:
        try:
            update["seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise GraftrError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
        if not update["seeds"]:
            raise GraftrError("--seeds names no seed")
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {m.name for m in spec.methods}]
        if unknown:
            raise GraftrError(f"--only: no method named {', '.join(map(repr, unknown))} (methods: "
                              f"{', '.join(m.name for m in spec.methods)})")
        update["methods"] = [m for m in spec.methods if m.name in names]
    return Comparison.model_validate({**spec.model_dump(), **update}) if update else spec


def _check_out(out: Path, spec: Comparison) -> None:
    """``--out`` is new, empty, or an earlier run of this same comparison (which it continues)."""
    marker = out / SPEC_FILE
    if out.exists() and not out.is_dir():
        raise GraftrError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise GraftrError(f"--out {out} holds files that are not a graftr comparison; choose a new directory")
        earlier = json.loads(marker.read_text())
        mine = json.loads(spec.model_dump_json())
        if {k: v for k, v in earlier.items() if k not in ("seeds", "methods")} != \
                {k: v for k, v in mine.items() if k not in ("seeds", "methods")}:
            raise GraftrError(f"--out {out} holds a comparison with other settings ({marker}); choose another --out")


def main(args) -> int:
    from rich.table import Table

    from graftr.console import console
    from graftr.formats.files import write_text_atomically

    spec, base = load(args.spec, args.overrides)
    spec = _select(spec, args.seeds, args.only)
    out = Path(args.out or os.path.join("runs", f"compare-{re.sub(r'[^A-Za-z0-9_-]+', '-', spec.name)}"))
    _check_out(out, spec)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")
    runner = Runner(spec, base, out, console)
    total = len(spec.seeds) * len(spec.methods)
    console.print(f"[bold]{spec.name}[/]: {len(spec.methods)} methods × {len(spec.seeds)} seed(s) on {spec.model}, "
                  f"{runner.data} → {out}")
    runs, done = [], 0
    for seed in spec.seeds:  # seed-major: an interrupted comparison has every method at the first seeds
        for method in spec.methods:
            done += 1
            kept = runner.finished(method, seed) is not None
            summary = runner.run(method, seed)
            final = summary["evals"][-1] if summary["evals"] else {}
            metric = metric_of(summary["evals"])
            console.print(f"[{done}/{total}] {method.name} seed {seed}: {metric.replace('_', ' ')} "
                          f"{final.get(metric, math.nan):.4f}, {summary['tokens_per_s']:,.0f} tok/s"
                          + (" (kept from an earlier run)" if kept else ""), highlight=False)
            runs.append(summary)
    rows = summarize(spec, runs)
    command = "graftr compare " + " ".join([args.spec, *(["--out", args.out] if args.out else []),
                                            *(["--seeds", args.seeds] if args.seeds else []),
                                            *(["--only", repr(args.only)] if args.only else []), *args.overrides])
    meta = {"machine": _machine(), "command": command, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_text_atomically(out / "results.json", json.dumps({"comparison": json.loads(spec.model_dump_json()),
                                                            **meta, "methods": rows, "runs": runs},
                                                           indent=2, default=str) + "\n")
    write_text_atomically(out / "results.md", markdown(spec, rows, command, meta))
    draw(spec, rows, out / "curves.png")
    table = Table(title=f"{spec.name}: {spec.model}, seeds {', '.join(map(str, spec.seeds))}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("family", "method", "held-out") else "right")
    for cells in table_rows(spec, rows):
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.png'}", highlight=False)
    return 0


def _machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_baseline(spec_path: str) -> int:
    """``python -m graftr.compare run SPEC.json``: train one PEFT baseline with graftr's loop (one process)."""
    from graftr.baselines import PeftBaseline
    from graftr.console import console
    from graftr.quiet import quiet
    from graftr.train.config import TrainConfig
    from graftr.train.loop import train

    quiet()
    spec = json.loads(Path(spec_path).read_text())
    baseline = PeftBaseline(name=spec["name"], peft=spec["peft"], train=TrainConfig.model_validate(spec["train"]),
                            model=spec["model"], task=spec.get("task"), num_labels=spec.get("num_labels"))
    try:
        train(baseline, model_id=spec["model"], data=spec["data"], out=spec["out"], resume=False, console=console)
    except GraftrError as e:
        from graftr.console import errors

        errors.print(f"error: {e}", markup=False, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "run":
        sys.exit("usage: python -m graftr.compare run BASELINE.json (graftr compare runs it)")
    sys.exit(run_baseline(sys.argv[2]))
