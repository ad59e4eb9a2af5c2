"""lm-evaluation-harness benchmarks on a grafted model in memory: ``graftr eval --tasks``.

The grafted model is a ``PreTrainedModel`` (:mod:`graftr.hf`), so the harness's own ``HFLM`` wraps it as it is —
no merge, no conversion — and any adapter kind evaluates, mergeable or not (gated prompts, InA with p > 0). Its
log-likelihood requests are those of ``HFLM`` on the HF model with the adapter merged, where it merges.

Tasks are looked up by lm-eval's ``TaskManager``: ``--include-path DIR`` adds local task YAMLs (a local task with a
local data file runs offline); when every task named is found there, lm-eval's own task index (thousands of YAML
files, a minute to scan on a small machine) is not read. Hub tasks (``arc_easy``, ``hellaswag``, ...) read their
datasets through ``datasets``: offline (``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``) they must be in the local
cache, and a missing one is one ``error:`` line. Every task's data is loaded before the model's weights are read,
so such an error costs nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from graftr.errors import GraftrError

RESULTS_SUFFIX = ".lm_eval.json"


def add_arguments(parser) -> None:
    """The harness flags of ``graftr eval`` (``--batch-size`` is shared with ``--data``)."""
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag); "
                                        "evaluates with the harness instead of --data")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--limit", type=float, help="evaluate only the first N documents of each task "
                                                    "(a fraction when below 1)")
    parser.add_argument("--include-path", action="append", metavar="DIR",
                        help="a directory of local task YAMLs (repeatable)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template (the user's turn; answers follow the "
                             "assistant header), as lm-eval's own flag: for chat models and adapters trained on chat "
                             "data")
    parser.add_argument("--out", help="where to write the harness's results JSON (default: next to the adapter, "
                                      f"ADAPTER{RESULTS_SUFFIX})")


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise GraftrError("--tasks names no task")
    return names


def load_tasks(names: list[str], include_path: list[str] | None):
    """The harness's loaded tasks (its ``TaskManager.load`` result) and the manager; datasets are read here."""
    _quiet()
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p)) for p in include_path or []]
    for path in paths:
        if not Path(path).is_dir():
            raise GraftrError(f"--include-path {path} is not a directory")
    manager = None
    if paths:  # local tasks only: skip indexing the harness's own task list
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hint = "" if paths else "; --include-path DIR adds local task YAMLs"
        raise GraftrError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}")
    try:
        loaded = manager.load(names)
    except GraftrError:
        raise
    except Exception as e:  # the dataset of a task: not cached offline, unreachable, malformed local file
        raise GraftrError(f"cannot load the data of task(s) {', '.join(names)}: {_one_line(e)}{_offline_hint(e)}") \
            from None
    return loaded, manager


def _offline_hint(error: Exception) -> str:
    text = f"{type(error).__name__} {error}"
    if "Offline" in text or "reach" in text or isinstance(error, ConnectionError):
        return ("; hub datasets must be in the local datasets cache when offline (HF_HUB_OFFLINE/"
                "HF_DATASETS_OFFLINE): load the task once with network access, or use a local task YAML")
    return ""


def _one_line(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first[:300]


def evaluate_tasks(gm, tokenizer, names: list[str], *, include_path: list[str] | None = None,
                   num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                   preloaded=None, apply_chat_template: bool = False) -> dict:
    """Run the harness's ``simple_evaluate`` on ``gm`` (any grafted model, in memory) and return its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if gm.task not in ("causal_lm", "seq2seq_lm"):
        raise GraftrError(f"lm-eval tasks need a causal_lm or seq2seq_lm model; this one is {gm.task}")
    loaded, manager = preloaded or load_tasks(names, include_path)
    manager.load = lambda _tasks: loaded  # simple_evaluate loads the tasks again otherwise (datasets included)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = int(limit) if limit is not None and limit >= 1 else limit
    lm = HFLM(pretrained=gm, tokenizer=tokenizer, batch_size=batch_size)
    if apply_chat_template and not tokenizer.chat_template:
        raise GraftrError("--apply-chat-template: the tokenizer has no chat template")
    results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, apply_chat_template=apply_chat_template)
    if results is None:
        raise GraftrError("lm-eval returned no results")
    return results


def _quiet() -> None:
    """lm-eval logs each step at INFO and warns that ``limit`` is for testing: keep errors only."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def results_path(out: str | None, adapter: str | None) -> Path | None:
    if out:
        return Path(out)
    if adapter:
        return Path(str(Path(adapter)) + RESULTS_SUFFIX)
    return None


def write_results(results: dict, path: Path, *, extra: dict) -> None:
    """The results JSON (the harness's, plus what was evaluated), written atomically."""
    from lm_eval.utils import handle_non_serializable

    from graftr.formats.files import write_text_atomically

    if path.is_dir():
        raise GraftrError(f"--out {path} is a directory; name the results file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"graftr": extra, **results}, indent=2,
                                           default=handle_non_serializable) + "\n")


def require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise GraftrError("--tasks runs lm-evaluation-harness, which is not installed: pip install 'graftr[eval]' "
                          "(or pip install lm-eval)")


def main(args) -> int:
    """``graftr eval --tasks ...``: the base (``--model``) with the adapter (``--adapter``, optional; repeated, each
    adapter in turn on one loaded base, its results labelled and written beside it)."""
    from graftr.console import console as out
    from graftr.formats import load_adapter
    from graftr.hf import GraftedModel
    from graftr.load import load_with_weights, resolve_base
    from graftr.models import load_tokenizer
    from graftr.names import torch_dtype

    names = task_names(args.tasks)
    require_lm_eval()
    from lm_eval.utils import make_table

    adapters = list(dict.fromkeys(args.adapter or [])) if isinstance(args.adapter, list) else \
        [args.adapter] if args.adapter else []
    if args.batch_size < 1:
        raise GraftrError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise GraftrError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise GraftrError(f"--limit must be > 0, got {args.limit}")
    if args.out and len(adapters) > 1:
        raise GraftrError("--out names one results file; with several --adapter each adapter's results are written "
                          "beside it")
    # configs only: fails fast
    base = resolve_base(args.model, adapters[0] if adapters else None, weights=True, console=out,
                        trust_code=args.trust_code)
    preloaded = load_tasks(names, args.include_path)  # every dataset, before any weight is read
    loaded = load_with_weights(base, adapters[0] if adapters else None, dtype=torch_dtype(args.dtype),
                               cls=GraftedModel)
    gm = loaded.gm
    labels = {path: "default" if i == 0 else f"adapter{i + 1}" for i, path in enumerate(adapters)}
    for path in adapters[1:]:
        load_adapter(gm, path, adapter_name=labels[path], trust_code=args.trust_code)
    gm.eval()
    tokenizer = load_tokenizer(loaded.source)
    for adapter in adapters or [None]:
        if len(adapters) > 1:
            gm.set_adapter(labels[adapter], inference_mode=True)
            out.print(f"[bold]=== {adapter}[/]", highlight=False)
        target = results_path(args.out, adapter)
        start = time.perf_counter()
        results = evaluate_tasks(gm, tokenizer, names, num_fewshot=args.num_fewshot, limit=args.limit,
                                 batch_size=args.batch_size, preloaded=preloaded,
                                 apply_chat_template=args.apply_chat_template)
        seconds = time.perf_counter() - start
        out.print(make_table(results), markup=False, highlight=False)
        if "groups" in results:
            out.print(make_table(results, "groups"), markup=False, highlight=False)
        what = f"{adapter} on {loaded.source.model_id}" if adapter else loaded.source.model_id
        if target is not None:
            write_results(results, target, extra={"model": loaded.source.model_id, "adapter": adapter,
                                                   "tasks": names, "num_fewshot": args.num_fewshot,
                                                   "limit": args.limit,
                                                   "apply_chat_template": args.apply_chat_template,
                                                   "seconds": round(seconds, 2)})
            out.print(f"{what}: wrote the results to {target}", highlight=False)
        else:
            out.print(f"{what}: pass --out FILE to keep the results JSON", highlight=False)
    return 0
