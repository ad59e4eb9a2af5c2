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
                if task in _POSITION_TASKS:  # logits at the scored positions only (GraftedModel.logits_at)
                    logits, targets, _ = scored_logits(model, inputs, labels, task)
                    loss = F.cross_entropy(logits, targets, reduction="sum")
                    count, correct = torch.tensor(targets.numel(), device=device), (logits.argmax(-1) == targets).sum()
                else:
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


_POSITION_TASKS = ("causal_lm", "masked_lm")  # tasks whose scored positions are those of their labels


def _direct(model):
    """The grafted model inside ``model`` when its graph may be called directly (``logits_at``), else None: not a
    grafted model, or a DeepSpeed engine under ZeRO-3, which gathers parameters in hooks around module calls."""
    from graftr.grafted import GraftedModel

    inner = getattr(model, "module", model)
    if not isinstance(inner, GraftedModel):
        return None
    stage = getattr(model, "zero_optimization_stage", None)
    return None if inner is not model and stage is not None and stage() == 3 else inner


def scored_logits(model, inputs: dict, labels: torch.Tensor, task: str):
    """(logits (N, V) in fp32, targets (N,), the row of each) at the N positions whose label is scored (a causal LM
    predicts label t + 1 at position t). A grafted model applies its head at those positions only."""
    if task == "causal_lm":
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        at = F.pad(scored, (0, 1), value=False)  # position t scores label t + 1
    else:
        targets = labels
        scored = at = labels != IGNORE_INDEX
    direct = _direct(model)
    if direct is not None:
        logits = direct.logits_at(at, **inputs)
    else:
        logits = model(**inputs).logits[at].float()
    return logits, targets[scored], at.nonzero()[:, 0]


def answer_metric(model, answers, collate, tokenizer, *, batch_size: int = 8) -> dict[str, float]:
    """The held-out metric of :class:`graftr.data.Answers`: ``{"accuracy": ...}`` (choice: the choice whose tokens
    have the highest summed log-likelihood is the reference) or ``{"exact_match": ...}`` (the greedy answer,
    special tokens and surrounding space removed, equals the reference). Every rank scores the whole set (the sets
    are small; under ZeRO-3 every rank must run the same forwards).

    A choice set also gives the loss (and perplexity, tokens, examples) of :func:`evaluate` on the eval split: the
    reference's option *is* the eval example, tokenized the same way, so its scored tokens are the split's, and
    no second pass over the split is needed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if answers.metric == "choice":
                return _choice_accuracy(model, answers, collate, batch_size, device)
            texts = greedy_answers(model, tokenizer, answers.prompts, max_new_tokens=_answer_room(tokenizer, answers),
                                   batch_size=batch_size)
    finally:
        model.train(was_training)
    hits = sum(text.strip() == reference.strip() for text, reference in zip(texts, answers.references))
    return {"exact_match": hits / len(answers)}


def _choice_accuracy(model, answers, collate, batch_size: int, device) -> dict[str, float]:
    scores, counts = _option_scores(model, answers.options, collate, batch_size, device)
    correct, at, loss, tokens = 0, 0, 0.0, 0
    for group, gold in zip(answers.options, answers.gold):
        mine = scores[at:at + len(group)]
        correct += int(max(range(len(group)), key=mine.__getitem__) == gold)
        loss, tokens = loss - mine[gold], tokens + counts[at + gold]
        at += len(group)
    mean = loss / tokens
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": tokens,
            "examples": len(answers), "accuracy": correct / len(answers)}


def _option_scores(model, groups: list[list[dict]], collate, batch_size: int, device):
    """Per option, in order: (summed log-likelihood of its scored tokens, their number). The options of an example
    share its prompt; where graftr's KV cache applies they run as one prompt step per example and one short step
    per option on the cached prompt (:func:`_shared_prompt_scores`: the prompt's cost once instead of once per
    choice), else each option is a row of its own."""
    from graftr.cache import CacheUnsupported, kv_cache_support

    direct = _direct(model)
    shared = [_shared_length(group) for group in groups]
    if (direct is not None and not direct.graftr_outlined and kv_cache_support(direct) is None and all(shared)
            and set(direct.graftr_input_names) <= {"input_ids", "attention_mask", "position_ids"}):
        try:
            return _shared_prompt_scores(direct, groups, shared, batch_size, device)
        except CacheUnsupported:  # an adapter that changes what attention reads (prefix keys): one row per option
            pass
    flat = [option for group in groups for option in group]
    scores, counts = [], []
    for start in range(0, len(flat), batch_size):
        batch = {k: v.to(device) for k, v in collate(flat[start:start + batch_size]).items()}
        labels = batch.pop("labels")
        logits, targets, rows = scored_logits(model, batch, labels, "causal_lm")
        logprobs = -F.cross_entropy(logits, targets, reduction="none").double()
        per_row = torch.zeros(labels.shape[0], dtype=torch.float64, device=device).index_add_(0, rows, logprobs)
        scores += per_row.tolist()
        counts += torch.bincount(rows, minlength=labels.shape[0]).tolist()
    return scores, counts


def _shared_prompt_scores(gm, groups: list[list[dict]], shared: list[int], batch_size: int, device):
    """:func:`_option_scores` with the KV cache: up to ``batch_size`` examples at a time, their ``shared`` tokens
    (the options' common prefix, up to the first scored token) left-padded in one step whose last position scores
    each option's first token when it starts there; the cache then repeated per option and the options' remaining
    tokens run right-padded in one more step. Raises :class:`graftr.cache.CacheUnsupported` where the cache
    cannot serve the model (found on the first step)."""
    from graftr.cache import KVCache, enable_kv_cache
    from graftr.generate import positions

    enable_kv_cache(gm)
    scores, counts = [], []
    for start in range(0, len(groups), batch_size):
        chunk, lengths = groups[start:start + batch_size], shared[start:start + batch_size]
        tail = max(len(o["input_ids"]) - n for group, n in zip(chunk, lengths) for o in group)
        ids, mask = left_padded([group[0]["input_ids"][:n] for group, n in zip(chunk, lengths)], 0, device)
        cache = KVCache(len(chunk), ids.shape[1] + tail, device=device)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[:, -1] = True
        with cache.step(mask):
            first = gm.logits_at(last, input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        owner = [i for i, group in enumerate(chunk) for _ in group]  # the example of each option
        cache = cache.select(torch.tensor(owner, device=device))
        cont, cont_mask, at, targets, rows, heads = _continuations(chunk, lengths, tail)
        cont_pos = torch.tensor([lengths[i] for i in owner])[:, None] + torch.arange(tail)  # after the prompt
        with cache.step(cont_mask.to(device)):
            logits = gm.logits_at(at.to(device), input_ids=cont.to(device), attention_mask=cont_mask.to(device),
                                  position_ids=cont_pos.to(device))
        if heads:
            logits = torch.cat([logits, first[torch.tensor([h[0] for h in heads], device=device)]])
            targets += [h[2] for h in heads]
            rows += [h[1] for h in heads]
        targets, rows = torch.tensor(targets, device=device), torch.tensor(rows, dtype=torch.long, device=device)
        logprobs = -F.cross_entropy(logits, targets, reduction="none").double()
        scores += torch.zeros(len(owner), dtype=torch.float64, device=device).index_add_(0, rows, logprobs).tolist()
        counts += torch.bincount(rows, minlength=len(owner)).tolist()
    return scores, counts


def _continuations(chunk: list[list[dict]], lengths: list[int], tail: int):
    """The options' tokens after their example's shared ones, right-padded to ``tail``: (ids, mask, the positions
    whose next token is scored, those tokens, their option's row, and the options whose first scored token comes
    right after the shared ones as (example, row, token))."""
    rows_total = sum(len(group) for group in chunk)
    cont = torch.zeros(rows_total, tail, dtype=torch.long)
    mask = torch.zeros_like(cont)
    at = torch.zeros_like(cont, dtype=torch.bool)
    targets, rows, heads = [], [], []
    row = 0
    for i, (group, n) in enumerate(zip(chunk, lengths)):
        for option in group:
            tokens, labels = option["input_ids"], option["labels"]
            cont[row, :len(tokens) - n] = torch.tensor(tokens[n:])
            mask[row, :len(tokens) - n] = 1
            if labels[n] != IGNORE_INDEX:  # predicted at the shared tokens' last position
                heads.append((i, row, labels[n]))
            for t in range(n, len(tokens) - 1):
                if labels[t + 1] != IGNORE_INDEX:
                    at[row, t - n] = True
                    targets.append(labels[t + 1])
                    rows.append(row)
            row += 1
    return cont, mask, at, targets, rows, heads


def _shared_length(group: list[dict]) -> int:
    """How many leading tokens every option of an example shares, up to its first scored token (0: none)."""
    limit = min(next((t for t, label in enumerate(o["labels"]) if label != IGNORE_INDEX), len(o["input_ids"]))
                for o in group)
    reference = group[0]["input_ids"]
    n = 0
    while n < limit and all(o["input_ids"][n] == reference[n] for o in group):
        n += 1
    return n


def _answer_room(tokenizer, answers) -> int:
    """New tokens exact match generates: the longest reference's, plus room for an end-of-turn and a wrong answer."""
    return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in answers.references) + 8


def greedy_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded in batches), decoded without special tokens; never past
    the model's positions (a batch whose prompts fill them answers ""). A grafted model generates with graftr's KV
    cache (recomputing when its layers are outlined); others with ``generate``."""
    from graftr.grafted import GraftedModel

    inner = getattr(model, "module", model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit = getattr(inner, "graftr_max_positions", None) or getattr(getattr(inner, "config", None),
                                                                      "max_position_embeddings", None)
    texts = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        width = max(len(r) for r in rows)
        new = min(max_new_tokens, limit - width) if limit else max_new_tokens
        if new < 1:
            texts += [""] * len(rows)
            continue
        ids, mask = left_padded(rows, pad, device)
        if isinstance(inner, GraftedModel):
            from graftr.generate import eos_ids, generate_ids

            tokens = generate_ids(inner, ids, mask, max_new_tokens=new, eos_token_ids=eos_ids(inner, tokenizer),
                                  pad_token_id=pad, use_cache=not inner.graftr_outlined).tokens
        else:
            eos = {tokenizer.eos_token_id, *_listed(getattr(getattr(inner, "generation_config", None),
                                                               "eos_token_id", None))} - {None}
            tokens = inner.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    do_sample=False, eos_token_id=sorted(eos), pad_token_id=pad)[:, width:]
        texts += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return texts


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded with ``pad`` into one batch: (ids, attention mask), both (B, longest)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _listed(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


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

    add_model_arguments(parser, adapter_required=False, several=True)
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
    from graftr.load import load_adapters
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
                                             ("--include-path", args.include_path), ("--out", args.out),
                                             ("--apply-chat-template", args.apply_chat_template or None))
                    if value is not None]
    if harness_only:
        raise GraftrError(f"{', '.join(harness_only)} apply to --tasks (lm-eval benchmarks) only")
    if args.data is None:
        raise GraftrError("pass --data (a dataset to compute loss/accuracy on) or --tasks (lm-eval benchmarks)")
    if args.adapter is None:
        raise GraftrError("--data evaluates an adapter: pass --adapter (or use --tasks to evaluate the base alone)")
    if args.batch_size < 1:
        raise GraftrError(f"--batch-size must be >= 1, got {args.batch_size}")
    # several --adapter: one base, every adapter loaded into it (graftr.named), each evaluated alone in turn
    loaded, adapters = load_adapters(args.model, args.adapter, dtype=torch_dtype(args.dtype), console=console,
                                     trust_code=args.trust_code)
    gm = loaded.gm
    tokenizer = load_tokenizer(loaded.source)
    for adapter, name in adapters.items():
        gm.set_adapter(name, inference_mode=True)
        recipe = gm.recipes[name]
        cfg = data_config(recipe, args.overrides, args.split)
        if cfg.eval_split is None:
            raise GraftrError("the data settings name no eval split (eval_split: null); pass --split")
        train = recipe.train
        seed = train.get("seed", 0) if isinstance(train, dict) else getattr(train, "seed", 0)
        # Only the eval split is tokenized; without recorded class names the train split's labels count too, as in
        # training.
        names = _label_names(gm.hf_config) if gm.task == "seq_cls" else None
        _, eval_set, info = build_datasets(args.data, cfg, tokenizer, task=gm.task, seed=seed, label_names=names,
                                           eval_only=True)
        if eval_set is None:
            raise GraftrError(f"{args.data} has no split '{cfg.eval_split}'; pass --split")
        for note in info.notes:
            console.print(f"[yellow]note:[/] {note}")
        collator = Collator(tokenizer, image_processor=processor_for(gm))
        loader = DataLoader(eval_set, batch_size=args.batch_size, shuffle=False, collate_fn=collator)
        answers = info.answers
        metrics = {}
        if answers is None or answers.metric != "choice":  # a choice set gives the split's loss too (answer_metric)
            metrics = evaluate(gm, loader)
        if answers is not None:
            metrics.update(answer_metric(gm, answers, collator, tokenizer, batch_size=args.batch_size))
        table = Table(title=f"{adapter} on {cfg.eval_split} of {args.data}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for metric, value in metrics.items():
            table.add_row(metric, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
        console.print(table)
    return 0


def _label_names(config) -> list[str] | None:
    """The classifier's label names when they are real names (not transformers' LABEL_i placeholders)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names
