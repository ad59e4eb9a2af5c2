"""The ``graftr`` command line.

Every subcommand reports user errors (bad recipe, unknown model, adapter that does not fit) as one line on stderr
and exits with status 2; a traceback means a bug in graftr.

Start-up is kept short: nothing heavy (torch, transformers, datasets, DeepSpeed) is imported to build the parser,
and a subcommand's module is imported only when that subcommand runs (``graftr --help`` lists them all without
importing any).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.table import Table

from graftr.console import console, errors
from graftr.errors import GraftrError


def _fmt(n: int) -> str:
    return f"{n:,}"


def _load_base(model_arg: str | None, recipe=None, *, device: str = "meta", dtype=None):
    """Resolve the model id (flag, else the recipe's default) and build it without weights (fp32 unless dtype)."""
    from graftr.models import build_model, infer_task, resolve

    model_id = model_arg or (recipe.model if recipe is not None else None)
    if not model_id:
        raise GraftrError("no model given: pass --model (a hub id, a model directory or a config.json)")
    source = resolve(model_id)
    if source.note:
        console.print(f"[yellow]note:[/] {source.note}")
    task = (recipe.task if recipe is not None else None) or infer_task(source.config)
    num_labels = recipe.num_labels if recipe is not None else None
    return source, build_model(source.config, task, device=device, num_labels=num_labels, dtype=dtype), task


def cmd_apply(args) -> int:
    from graftr import passes
    from graftr.grafted import graft, prepare, summary
    from graftr.names import torch_dtype
    from graftr.passbase import run_passes
    from graftr.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.out:
        from graftr.formats.files import check_out
        from graftr.formats.graftr import MANIFEST

        check_out(Path(args.out), MANIFEST, force=args.force)
    t0 = time.perf_counter()
    source, model, task = _load_base(args.model, recipe, dtype=torch_dtype(args.dtype))
    t_build = time.perf_counter()
    # a plan on the meta device never runs: trace the example shapes only (the same sites, in half the time)
    gm = prepare(model, model_id=source.model_id, task=task, dynamic=False)
    t_trace = time.perf_counter()
    console.print(f"[bold]{recipe.name}[/] on [bold]{source.model_id}[/] ({gm.hf_class}, task {task}): traced in "
              f"{t_trace - t_build:.1f} s, {len(gm.site_index.linear)} linear and "
              f"{len(gm.site_index.attention)} attention sites"
              + (f", {len(gm.site_index.experts)} expert sites (experts_implementation=grouped_mm)"
                 if gm.site_index.experts else ""))
    if args.dry_run:
        from graftr.quantize import active, select

        if active(recipe.quantize):
            chosen = select(gm, recipe.quantize, recipe.trainable_modules)
            console.print(f"quantize ({recipe.quantize.method}): {len(chosen)} of {len(gm.site_index.linear)} linear "
                          f"sites would be stored quantized (e.g. {', '.join(s.path for s in chosen[:2])})")
        run_passes(gm, passes.MatchPass(recipe))  # annotate only
        plans = passes.planned(gm.site_index, recipe)
        table = Table(title="plan (dry run: matching only)")
        for col in ("rule", "kind", "sites", "example paths"):
            table.add_column(col)
        for p in plans:
            table.add_row(p.name, p.rule.adapter.kind, str(len(p.sites)), "\n".join(s.path for s in p.sites[:3]))
        console.print(table)
        return 0
    gm = graft(gm, recipe)
    from graftr import quantize

    if (line := quantize.summary(gm)) is not None:
        console.print(f"{line} (e.g. {', '.join(list(gm.graftr_quantized)[:2])})")
    s = summary(gm)
    table = Table(title="adapters inserted")
    for col, justify in (("rule", "left"), ("kind", "left"), ("sites", "right"), ("params added", "right"),
                         ("example paths", "left")):
        table.add_column(col, justify=justify)
    for r in s["rules"]:
        table.add_row(r["rule"], r["kind"], str(r["sites"]), _fmt(r["params"]), "\n".join(r["examples"]))
    console.print(table)
    console.print(f"trainable params: [bold]{_fmt(s['trainable'])}[/] / total: {_fmt(s['total'])} "
              f"({s['percent']:.4f}%)   [dim]{time.perf_counter() - t0:.1f} s[/]")
    base_bytes = sum(p.numel() * p.element_size() for p in gm.parameters() if not p.requires_grad)
    base_bytes += quantize.stored_bytes(gm)  # the quantized weights' packed storage
    console.print(f"base weights in {args.dtype}: {base_bytes / 2**30:.2f} GiB; adapters "
              f"{', '.join(sorted({str(p.dtype).removeprefix('torch.') for p in gm.parameters() if p.requires_grad}))}")
    if args.out:
        from graftr.formats.graftr import save_adapter

        save_adapter(gm, args.out, force=args.force)
        console.print(f"saved the initial adapter to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from graftr.grafted import prepare
    from graftr.selectors import compile_glob

    source, model, task = _load_base(args.model)
    gm = prepare(model, model_id=source.model_id, task=task)
    try:
        rx = compile_glob(args.filter) if args.filter else None
    except ValueError as e:
        raise GraftrError(f"--filter: {e}") from None
    table = Table(title=f"sites of {source.model_id} ({gm.hf_class})")
    for col in ("path", "class", "op", "shape", "layer"):
        table.add_column(col)
    rows = 0
    for site in gm.site_index.all():
        if (rx and not rx.fullmatch(site.path)) or (args.op and site.op != args.op):
            continue
        if site.op == "linear":
            shape = f"{site.in_features} → {site.out_features}" + (" (router)" if site.role == "router" else "")
        elif site.op == "experts":
            shape = f"{site.num_experts} experts × {site.in_features} → {site.out_features}" + (
                f", gate|up {site.fused}" if site.fused else "") + (", bias" if site.bias else "")
        else:
            shape = f"heads {site.num_heads}, kv {site.num_kv_heads}, head_dim {site.head_dim}"
        table.add_row(site.path, site.module_class, site.op, shape, "" if site.layer is None else str(site.layer[1]))
        rows += 1
    if rows == 0:
        raise GraftrError(f"no site matches --filter {args.filter!r}" + (f" and --op {args.op}" if args.op else ""))
    console.print(table)
    stacks = ", ".join(f"{k} ({v})" for k, v in gm.site_index.stack_sizes.items())
    console.print(f"{rows} sites; layer stacks: {stacks or 'none'}")
    if gm.grafting.experts_implementation is not None or gm.site_index.experts:
        console.print(f"experts traced with experts_implementation=grouped_mm (the model had "
                      f"{gm.grafting.experts_implementation}); expert sites are selected with op: experts or their "
                      "parameter path, some experts with match.experts")
    return 0


def cmd_validate(args) -> int:
    from graftr.recipe import load_recipe

    failures = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
        except GraftrError as e:
            errors.print(f"[red]✗[/] {e}", highlight=False, soft_wrap=True)
            failures += 1
            continue
        console.print(f"[green]✓[/] {path}: {recipe.name} ({len(recipe.rules)} rules)")
    return 2 if failures else 0


def cmd_schema(args) -> int:
    from graftr.formats.files import write_text_atomically
    from graftr.recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if args.out:
        write_text_atomically(Path(args.out), text)
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graftr")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class Parser(argparse.ArgumentParser):
    """argparse with graftr's error contract: a usage error is one ``error:`` line and exit status 2 (argparse
    prints the usage and ``graftr train: error: ...`` on two lines). Subcommand parsers are of this class too."""

    def error(self, message: str):
        errors.print(f"[red]error:[/] {message} (see {self.prog} --help)", highlight=False, soft_wrap=True)
        self.exit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module (if it has one) is imported, to add its arguments."""
    parser = Parser(prog="graftr", description="graftr: trace a transformer, match a recipe, insert "
                                     "adapters, train them with DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"graftr {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own warnings, logs and progress bars (DeepSpeed, torch, "
                             "transformers, datasets), which graftr hides by default")
    # `deepspeed --module graftr.cli train ...` puts --local_rank=N before the subcommand (LOCAL_RANK says the same)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("apply", help="trace a model, match a recipe and insert its adapters; print the plan")
    p.add_argument("recipe", help="the recipe YAML")
    p.add_argument("--model", help="hub id (local cache or bundled snapshot), model directory or config.json; "
                                   "default: the recipe's `model`")
    p.add_argument("--out", help="save the initial adapter to this directory")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier adapter")
    p.add_argument("--dry-run", action="store_true", help="match only: show which sites each rule selects")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the base is built and traced in (default float32); adapters keep their own dtype")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("inspect", help="list the sites a recipe can target (path, class, op, shape)")
    p.add_argument("--model", required=True, help="hub id (local cache or bundled snapshot), model directory or "
                                                  "config.json")
    p.add_argument("--filter", help="module path glob, e.g. 'model.layers.0.**'")
    p.add_argument("--op", choices=("linear", "attention", "experts"), help="only sites of this kind")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", help="check recipes without building anything; report every error at once")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the recipe JSON Schema (for editor autocompletion)")
    p.add_argument("--out", help="write it to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    _add_module_commands(sub, command)
    return parser


# Subcommands implemented in their own modules: each module has add_arguments(parser) and main(args) -> int.
COMMAND_MODULES = {
    "train": ("graftr.train.command", "train a recipe's adapters with DeepSpeed (one process or many)"),
    "merge": ("graftr.merge", "fold mergeable adapters into the base weights and write a plain HF model directory"),
    "deploy": ("graftr.deploy", "export the adapted model as programs that run with torch alone (model.pt2, a "
                                "KV-cache step, the tokenizer): non-mergeable adapters included"),
    "export": ("graftr.formats.command", "write an adapter in another format (PEFT)"),
    "generate": ("graftr.generate", "generate text with a grafted model"),
    "eval": ("graftr.evaluate", "evaluate a grafted model: loss/perplexity or accuracy on a dataset, or lm-eval "
                                "benchmarks (--tasks)"),
    "plot": ("graftr.plot", "draw the train/eval loss (and accuracy) of one or more runs into a PNG"),
    "estimate": ("graftr.estimate", "a training run's memory per rank, from the config alone (no weights read)"),
    "compare": ("graftr.compare", "train several recipes and PEFT baselines on the same model, data, steps and "
                                  "seeds; compare held-out quality, speed, memory and size"),
}


def _add_module_commands(sub, command: str | None) -> None:
    """Every module command is listed; only ``command``'s module is imported (for its arguments and ``main``)."""
    import importlib

    for name, (module_name, help_text) in COMMAND_MODULES.items():
        p = sub.add_parser(name, help=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=module.main)


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option or an option's value)."""
    words = iter(argv)
    for word in words:
        if word in ("--local_rank", "--local-rank"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    from graftr.quiet import quiet

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    # before any library is imported (the command's module may import them): their settings are read at import
    before = argv[: argv.index(command)] if command in argv else argv
    quiet(verbose="-v" in before or "--verbose" in before)
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, one line: Parser.error)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except GraftrError as e:
        errors.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
