"""Evaluation: loss and perplexity of language models, accuracy and loss of classifiers.

:func:`evaluate` is the one definition of the numbers, used by ``graftr eval`` and by the training loop's eval:

* language models (causal, masked, seq2seq): the **token-weighted** mean cross-entropy over every label that is
  not ``-100`` in the whole set (a causal LM predicts token ``t+1`` from position ``t``), and
  ``perplexity = exp(loss)``; batches of different sizes or padding weigh by their tokens, not equally;
* sequence classification: the mean cross-entropy over examples and the fraction of examples whose arg-max logit
  is the label.

Sums are taken in fp32 (logits are upcast), so the result does not depend on the batch size beyond rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graftr.errors import GraftrError
from graftr.loss import IGNORE_INDEX
from graftr.names import LM_TASKS


def evaluate(model, loader, *, task: str | None = None, distributed: bool = False) -> dict[str, float]:
    """Evaluate ``model`` (a GraftedModel, or an engine wrapping one as ``.module``) on every batch of ``loader``.

    Batches are dicts of tensors with ``labels`` (as :class:`graftr.data.Collator` makes them); they are moved to
    the model's device. ``task`` defaults to the model's. With ``distributed`` the sums are all-reduced over the
    process group, so every rank gets the numbers of the whole set when each evaluates its own shard.

    Returns ``{"loss", "perplexity", "tokens", "examples"}`` for language models and
    ``{"loss", "accuracy", "examples"}`` for classifiers.
    """
    task = task or getattr(getattr(model, "module", model), "task", None)
    if task not in LM_TASKS and task != "seq_cls":
        raise GraftrError(f"evaluation is defined for {', '.join(LM_TASKS)} and seq_cls, not {task}")
    device = next(model.parameters()).device
    # loss sum, count (tokens or examples), correct predictions, examples
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch["labels"]
                # the loss is computed here; only a seq2seq model needs the labels (its decoder inputs)
                inputs = {k: v for k, v in batch.items() if k != "labels" or task == "seq2seq_lm"}
                loss, count, correct = _sums(task, model(**inputs).logits.float(), labels)
                totals += torch.stack([loss.double(), count.double(), correct.double(),
                                       torch.tensor(labels.shape[0], dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if distributed:
        torch.distributed.all_reduce(totals)
    loss_sum, count, correct, examples = totals.tolist()
    if count == 0:
        raise GraftrError("the evaluation data has no label to score (empty set or every label ignored)")
    loss = loss_sum / count
    if task == "seq_cls":
        return {"loss": loss, "accuracy": correct / count, "examples": int(examples)}
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": int(count),
            "examples": int(examples)}


def _sums(task: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, count, correct) of one batch."""
    if task == "causal_lm":  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    if task == "seq_cls" and logits.shape[-1] == 1:
        raise GraftrError("evaluation of regression heads (num_labels 1) is not supported")
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    scored = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & scored).sum()
    return loss, scored.sum(), correct


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from graftr import harness
    from graftr.load import add_model_arguments

    add_model_arguments(parser, adapter_required=False)
    parser.add_argument("--data", help="a data file, a directory of split files or a hub dataset (needs --adapter)")
    parser.add_argument("--split", help="the split to evaluate (default: the recipe's eval split)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    harness.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                        help="override the recipe's train.data fields, e.g. data.max_length=256 data.format=text")


def data_config(recipe, overrides: list[str], split: str | None):
    """The recipe's DataConfig with ``data.KEY=VALUE`` overrides (YAML values) and the split to evaluate."""
    from pydantic import ValidationError

    from graftr.data import DataConfig
    from graftr.load import recipe_data
    from graftr.recipe import apply_override, parse_override

    fields = recipe_data(recipe) or {}
    for item in overrides:
        keys, value = parse_override(item) if "=" in item else ((), None)
        if len(keys) < 2 or keys[0] != "data":
            raise GraftrError(f"override {item!r} is not data.KEY=VALUE")
        apply_override(fields, keys[1:], value, item)
    if split is not None:
        fields["eval_split"] = split
    try:
        return DataConfig.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"data.{'.'.join(map(str, p['loc'])) or '(top)'}: {p['msg']}" for p in e.errors())
        raise GraftrError(f"invalid data settings: {problems}") from None


def main(args) -> int:
    from rich.table import Table
    from torch.utils.data import DataLoader

    from graftr.console import console
    from graftr.data import Collator, build_datasets
    from graftr.load import load_for_inference
    from graftr.names import torch_dtype
    from graftr.models import load_tokenizer
    from graftr.vision import processor_for

    if args.tasks is not None:  # lm-evaluation-harness benchmarks (graftr.harness)
        from graftr import harness

        given = [flag for flag, value in (("--data", args.data), ("--split", args.split),
                                          ("data.KEY=VALUE", args.overrides)) if value]
        if given:
            raise GraftrError(f"{', '.join(given)} cannot be combined with --tasks (the tasks bring their own data)")
        return harness.main(args)
    harness_only = [flag for flag, value in (("--num-fewshot", args.num_fewshot), ("--limit", args.limit),
                                             ("--include-path", args.include_path), ("--out", args.out))
                    if value is not None]
    if harness_only:
        raise GraftrError(f"{', '.join(harness_only)} apply to --tasks (lm-eval benchmarks) only")
    if args.data is None:
        raise GraftrError("pass --data (a dataset to compute loss/accuracy on) or --tasks (lm-eval benchmarks)")
    if args.adapter is None:
        raise GraftrError("--data evaluates an adapter: pass --adapter (or use --tasks to evaluate the base alone)")
    if args.batch_size < 1:
        raise GraftrError(f"--batch-size must be >= 1, got {args.batch_size}")
    loaded = load_for_inference(args.model, args.adapter, dtype=torch_dtype(args.dtype), console=console,
                                trust_code=args.trust_code)
    cfg = data_config(loaded.recipe, args.overrides, args.split)
    if cfg.eval_split is None:
        raise GraftrError("the data settings name no eval split (eval_split: null); pass --split")
    tokenizer = load_tokenizer(loaded.source)
    train = loaded.recipe.train if loaded.recipe is not None else None
    seed = train.get("seed", 0) if isinstance(train, dict) else getattr(train, "seed", 0)
    # Only the eval split is tokenized; without recorded class names the train split's labels count too, as in training.
    names = _label_names(loaded.gm.hf_config) if loaded.gm.task == "seq_cls" else None
    _, eval_set, info = build_datasets(args.data, cfg, tokenizer, task=loaded.gm.task, seed=seed, label_names=names,
                                       eval_only=True)
    if eval_set is None:
        raise GraftrError(f"{args.data} has no split '{cfg.eval_split}'; pass --split")
    for note in info.notes:
        console.print(f"[yellow]note:[/] {note}")
    collator = Collator(tokenizer, image_processor=processor_for(loaded.gm))
    loader = DataLoader(eval_set, batch_size=args.batch_size, shuffle=False, collate_fn=collator)
    metrics = evaluate(loaded.gm, loader)
    table = Table(title=f"{args.adapter} on {cfg.eval_split} of {args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    console.print(table)
    return 0


def _label_names(config) -> list[str] | None:
    """The classifier's label names when they are real names (not transformers' LABEL_i placeholders)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names
