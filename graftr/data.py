"""Data pipeline: Hugging Face ``datasets`` -> tokenized examples -> padded batches.

:func:`load_raw` reads a local file, a directory of split files or a Hub dataset; :func:`build_datasets` selects
the train and eval splits and tokenizes them for one of four formats; :class:`Collator` pads examples into batches.

=================  ==========================  ===========================================================
format             tasks                       labels
=================  ==========================  ===========================================================
``alpaca``         causal_lm, seq2seq_lm       causal: -100 on the prompt, the response and eos are
                                               learned; seq2seq: the tokenized ``output``
``chat``           causal_lm                   only the assistant turns (content and the template's
                                               end-of-turn text) are learned
``text``           causal_lm                   every token (``labels == input_ids``); ``packing`` cuts the
                                               eos-joined documents into blocks of ``max_length``
``classification`` seq_cls                     one class id per example
=================  ==========================  ===========================================================

Without ``format`` the format is inferred from the train split's columns (:func:`infer_format`): ``messages`` is
chat, ``instruction`` + ``output`` is alpaca, a text column + ``label`` is classification (for a seq_cls model),
``text`` is text; the choice is reported in :attr:`DataInfo.notes`, and columns that fit two formats are an error.

Examples with no learned token left (no assistant turn, a response truncated away) are dropped and counted in
:attr:`DataInfo.notes`. Nothing is random except the ``eval_fraction`` split, which is seeded.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from graftr.errors import GraftrError
from graftr.loss import IGNORE_INDEX
from graftr.sections import PROMPT_TEMPLATES, DataConfig

if TYPE_CHECKING:  # imported where used: recipes validate (graftr apply) without loading `datasets`
    import datasets


_FORMATS_BY_TASK = {"causal_lm": ("alpaca", "chat", "text"), "seq2seq_lm": ("alpaca",), "seq_cls": ("classification",)}

# File extension -> (datasets builder, builder options).
_BUILDERS: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
}
_SPLIT_FILE = re.compile(r"(train|validation|valid|dev|test)([-_.].*)?", re.IGNORECASE)
_SPLIT_ALIASES = {"valid": "validation", "dev": "validation"}


class TokenizedSet(torch.utils.data.Dataset):
    """Tokenized examples, each a dict of int lists (``labels`` is one int for classification)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    @property
    def num_tokens(self) -> int:
        """Input tokens over all examples (no padding)."""
        return sum(len(example["input_ids"]) for example in self.examples)


@dataclass
class Answers:
    """The eval split's checkable answers (``train.data.eval_metric``), scored by :func:`graftr.evaluate.answer_metric`.

    Every example has its reference text and its prompt's token ids (the tokens before the first learned one, as
    training tokenizes the example). ``choice`` adds, for each example, one tokenized example per choice (the answer
    replaced by the choice) and the index of the reference among them."""

    metric: str  # "choice" or "exact_match"
    references: list[str]
    prompts: list[list[int]]
    options: list[list[dict]] = field(default_factory=list)  # choice
    gold: list[int] = field(default_factory=list)  # choice

    def __len__(self) -> int:
        return len(self.references)


@dataclass
class DataInfo:
    """What :func:`build_datasets` produced; ``notes`` lists everything it changed or dropped."""

    num_train: int
    num_eval: int
    train_tokens: int
    eval_tokens: int
    max_length_seen: int  # longest example (packing: longest document) in tokens, before truncation
    label_names: list[str] | None = None  # classification only
    notes: list[str] = field(default_factory=list)
    config: DataConfig | None = None  # the config used, with the inferred format (and columns) filled in
    answers: Answers | None = None  # the eval split's checkable answers (train.data.eval_metric), if any

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


def format_prompt(example: dict, template: str = "alpaca") -> str:
    """The prompt for an ``{instruction, input}`` example; an empty or missing input selects the no-input form."""
    if template not in PROMPT_TEMPLATES:
        raise GraftrError(f"unknown prompt template {template!r} (known: {', '.join(PROMPT_TEMPLATES)})")
    forms = PROMPT_TEMPLATES[template]
    if example.get("input"):
        return forms["with_input"].format(instruction=example["instruction"], input=example["input"])
    return forms["no_input"].format(instruction=example["instruction"])


# --------------------------------------------------------------------------------------------- loading


def load_raw(source: str, cfg: DataConfig) -> datasets.DatasetDict:
    """Load ``source`` and check that the splits ``cfg`` names exist.

    ``source`` is a ``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` file (its one split is ``train``), a
    directory of such files split by name (``train.*``, ``validation.*``/``valid.*``/``dev.*``, ``test.*``; shards
    like ``train-00000-of-00002.parquet`` join their split), or a Hub dataset name, optionally ``name:config``.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        raw = _load_dir(path)
    elif path.is_file():
        raw = datasets.DatasetDict({"train": _load_files([path])})
    elif path.suffix.lower() in _BUILDERS or source.startswith((".", "/", "~")):
        raise GraftrError(f"data file not found: {source}")
    else:
        raw = _load_hub(source)
    if cfg.train_split not in raw:
        raise GraftrError(f"{source} has no split '{cfg.train_split}' (splits: {', '.join(raw)})")
    if "eval_split" in cfg.model_fields_set and cfg.eval_split is not None and cfg.eval_split not in raw:
        raise GraftrError(f"{source} has no split '{cfg.eval_split}' (splits: {', '.join(raw)})")
    return raw


def _load_files(files: list[Path]) -> datasets.Dataset:
    """Load data files of one extension as one split."""
    import datasets

    suffix = files[0].suffix.lower()
    if suffix not in _BUILDERS:
        raise GraftrError(f"unsupported data file extension '{suffix}' of {files[0]} "
                          f"(supported: {', '.join(_BUILDERS)})")
    builder, options = _BUILDERS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as error:  # datasets raises many types for unreadable files
        names = ", ".join(map(str, files))
        # An empty file (or a CSV header, a parquet file without rows) surfaces as one of these two.
        if isinstance(error, StopIteration) or "corresponds to no data" in str(error):
            raise GraftrError(f"{names} holds no example (the dataset is empty)") from error
        # datasets (pyarrow) names neither the file nor the line; find the first line that is not a JSON object
        where = _bad_json_line(files) if builder == "json" else None
        raise GraftrError(where or f"could not read {names}: {_first_line(error)}") from error


def _bad_json_line(files: list[Path]) -> str | None:
    """``file:line: problem`` for the first line of a JSON-lines file that is not one JSON object, else None. A
    ``.json`` file that is one valid document (an array of objects) has no bad line."""
    import json

    for file in files:
        if file.suffix.lower() == ".json":
            try:
                json.loads(file.read_bytes())
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # not one document: read it as JSON lines, as datasets does
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.rstrip(b"\r\n"))
                except UnicodeDecodeError:
                    return f"{file}:{number}: the line is not UTF-8 text"
                except json.JSONDecodeError as e:
                    return f"{file}:{number}: invalid JSON: {e.msg} (column {e.colno})"
                if not isinstance(row, dict):
                    return f"{file}:{number}: each line must be a JSON object, got {type(row).__name__}"
    return None


def _load_dir(path: Path) -> datasets.DatasetDict:
    """Load a directory whose data files are named after their split."""
    import datasets

    groups: dict[str, list[Path]] = {}
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.suffix.lower() not in _BUILDERS:
            continue  # READMEs, licences, hidden files
        match = _SPLIT_FILE.fullmatch(file.name[: -len(file.suffix)])
        if match is None:
            raise GraftrError(f"cannot tell the split of {file}: name data files train.*, validation.* "
                              "(or valid.*, dev.*) or test.*")
        split = match.group(1).lower()
        groups.setdefault(_SPLIT_ALIASES.get(split, split), []).append(file)
    if not groups:
        raise GraftrError(f"directory {path} holds no data file ({', '.join(_BUILDERS)})")
    for split, files in groups.items():
        if any(_BUILDERS[f.suffix.lower()] != _BUILDERS[files[0].suffix.lower()] for f in files):
            raise GraftrError(f"split '{split}' of {path} mixes file types: {', '.join(f.name for f in files)}")
    return datasets.DatasetDict({split: _load_files(files) for split, files in groups.items()})


def _load_hub(source: str) -> datasets.DatasetDict:
    """Load a Hub dataset (``name`` or ``name:config``) through the datasets cache."""
    import datasets

    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as error:  # offline, unknown name, missing config: all mean "not available"
        raise GraftrError(
            f"dataset '{source}' is not a local file or directory and could not be loaded from the Hugging Face "
            f"Hub or its local cache ({type(error).__name__}: {_first_line(error)}); "
            f"give a local {'/'.join(_BUILDERS)} file or a directory of them") from error


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# --------------------------------------------------------------------------------------------- format inference

# Text columns a classification set may have, single or paired (GLUE's task_to_keys), tried in this order.
_CLASSIFICATION_TEXT = (("text", None), ("sentence", None), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                        ("question1", "question2"), ("question", "sentence"))


def infer_format(columns: list[str], cfg: DataConfig, task: str, where: str) -> tuple[DataConfig, str | None]:
    """``cfg`` with its ``format`` (and, for classification, its text columns) filled in from ``columns``.

    Only the formats that fit ``task`` are candidates. Returns the config and a note saying what was chosen (None if
    ``cfg`` named its format); no candidate, or more than one, is a :class:`GraftrError` asking for ``format``.
    """
    if cfg.format is not None:
        return cfg, None
    given = cfg.model_fields_set
    present = set(columns)
    found: dict[str, tuple[list[str], dict]] = {}  # format -> (the columns it reads, the fields to set)
    if cfg.messages_column in present:
        found["chat"] = ([cfg.messages_column], {})
    if {"instruction", "output"} <= present:
        found["alpaca"] = (["instruction", "output", *(["input"] if "input" in present else [])], {})
    if cfg.label_column in present:
        pairs = [(cfg.text_column, cfg.text_pair_column)] if "text_column" in given else _CLASSIFICATION_TEXT
        for text, pair in pairs:
            if text in present and (pair is None or pair in present):
                fields = {"text_column": text, **({"text_pair_column": pair} if pair else {})}
                found["classification"] = ([text, *([pair] if pair else []), cfg.label_column], fields)
                break
    if cfg.text_column in present:
        found["text"] = ([cfg.text_column], {})
    allowed = _FORMATS_BY_TASK.get(task, ())
    fits = {name: value for name, value in found.items() if name in allowed}
    if len(fits) == 1:
        (name, (used, fields)), = fits.items()
        chosen = DataConfig.model_validate({**cfg.model_dump(exclude_unset=True), **fields, "format": name})
        return chosen, (f"data format {name} (inferred from the columns {', '.join(used)} of {where}; set "
                        "train.data.format to choose another)")
    expect = {"chat": f"'{cfg.messages_column}'", "alpaca": "'instruction' and 'output'",
              "classification": f"a text column and '{cfg.label_column}'", "text": f"'{cfg.text_column}'"}
    if not fits:
        other = f" (they fit {', '.join(found)}, which task {task} cannot train)" if found else ""
        raise GraftrError(f"cannot tell the data format of {where} from its columns ({', '.join(columns)}){other}: "
                          f"for task {task} expect " + " or ".join(f"{expect[f]} ({f})" for f in allowed)
                          + "; or set train.data.format")
    raise GraftrError(f"the columns of {where} fit more than one data format: "
                      + ", ".join(f"{name} ({', '.join(used)})" for name, (used, _) in fits.items())
                      + f"; set train.data.format to one of {', '.join(fits)}")


# --------------------------------------------------------------------------------------------- building


def build_datasets(source: str, cfg: DataConfig, tokenizer, *, task: str, seed: int = 0,
                   label_names: list | None = None,
                   eval_only: bool = False) -> tuple[TokenizedSet | None, TokenizedSet | None, DataInfo]:
    """Load ``source`` and tokenize its train and eval splits for ``task``.

    ``eval_only`` (``graftr eval``) tokenizes the eval split alone and returns ``None`` for train; the train split is
    still read, for ``eval_fraction`` and for the class names when ``label_names`` is not given.

    ``label_names`` (classification) fixes the class order: string labels map to their position in it and integer
    labels must index it. Without it, a ``ClassLabel`` column gives the names; otherwise string labels are sorted
    and integer labels ``0..max`` are named by their number (train and eval labels together).
    Sets ``tokenizer.pad_token`` to the eos token when it has none (noted in ``DataInfo.notes``).
    """
    if task not in _FORMATS_BY_TASK:
        raise GraftrError(f"the data pipeline does not support task '{task}' "
                          f"(supported: {', '.join(_FORMATS_BY_TASK)})")
    raw = load_raw(source, cfg)
    notes: list[str] = []
    cfg, note = infer_format(raw[cfg.train_split].column_names, cfg, task, f"split '{cfg.train_split}' of {source}")
    if note:
        notes.append(note)
    _check_task(cfg, tokenizer, task)
    if note := _ensure_pad_token(tokenizer):
        notes.append(note)
    splits = _select_splits(raw, source, cfg, seed, notes)

    names = None
    if cfg.format == "classification":
        names = _label_names(splits, cfg, label_names)
    encode = _encoder(cfg, tokenizer, task, names, _image_root(source))
    built, longest = [None] if eval_only else [], 0
    for where, ds in splits[1:] if eval_only else splits:
        if cfg.packing:
            examples, seen = _pack(ds, where, cfg, tokenizer, notes)
        else:
            examples, seen = _fit(encode, ds, where, cfg, notes)
        built.append(TokenizedSet(examples))
        longest = max(longest, seen)

    train, evaluation = built[0], (built[1] if len(built) > 1 else None)
    answers = _answers(encode, *splits[1], cfg, task) if evaluation is not None else None
    info = DataInfo(num_train=len(train) if train else 0, num_eval=len(evaluation) if evaluation else 0,
                    train_tokens=train.num_tokens if train else 0, eval_tokens=evaluation.num_tokens if evaluation else 0,
                    max_length_seen=longest, label_names=names, notes=notes, config=cfg, answers=answers)
    return train, evaluation, info


def _answers(encode: Callable, where: str, ds: datasets.Dataset, cfg: DataConfig, task: str) -> Answers | None:
    """The eval split's :class:`Answers` for ``cfg.eval_metric`` (``auto``: choice when the split has the choices
    column), or None when no such metric applies."""
    metric = cfg.eval_metric
    if metric == "auto":
        metric = "choice" if cfg.format in ("alpaca", "chat") and cfg.choices_column in ds.column_names else "none"
    if metric == "none":
        return None
    if task != "causal_lm" or cfg.format not in ("alpaca", "chat"):
        raise GraftrError(f"train.data.eval_metric {metric} scores the answers of alpaca or chat data on a causal_lm "
                          f"model, not {cfg.format} data on a {task} model")
    if metric == "exact_match" and cfg.image_column is not None:
        raise GraftrError("train.data.eval_metric exact_match generates answers from text prompts; with "
                          "image_column use choice (a choices column) or none")
    rows = [dict(row) for row in ds]
    references = [_reference(row, cfg, f"example {i} of {where}") for i, row in enumerate(rows)]
    prompts = []
    for i, example in enumerate(encode(ds, where, truncate=True)):
        first = next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX), None)
        if not first:
            raise GraftrError(f"example {i} of {where}: no prompt before its answer within max_length "
                              f"{cfg.max_length} (train.data.eval_metric {metric} scores the answer to the prompt)")
        prompts.append(example["input_ids"][:first])
    if metric == "exact_match":
        return Answers("exact_match", references, prompts)
    import datasets

    if cfg.choices_column not in ds.column_names:
        raise GraftrError(f"train.data.eval_metric choice needs a '{cfg.choices_column}' column in {where} "
                          f"(columns: {', '.join(ds.column_names)})")
    variants, owners, gold = [], [], []
    for i, (row, reference) in enumerate(zip(rows, references)):
        choices = row[cfg.choices_column]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise GraftrError(f"example {i} of {where}: '{cfg.choices_column}' must be a list of two or more strings")
        if reference not in choices:
            raise GraftrError(f"example {i} of {where}: its answer {reference!r} is not one of its choices "
                              f"({', '.join(map(repr, choices))})")
        gold.append(choices.index(reference))
        for choice in choices:
            variants.append(_with_answer(row, choice, cfg))
            owners.append(i)
    options: list[list[dict]] = [[] for _ in rows]
    encoded = encode(datasets.Dataset.from_list(variants), where, truncate=True)
    for owner, example in zip(owners, encoded):
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise GraftrError(f"example {owner} of {where}: a choice lies beyond max_length {cfg.max_length}")
        options[owner].append(example)
    return Answers("choice", references, prompts, options=options, gold=gold)


def _reference(row: dict, cfg: DataConfig, where: str) -> str:
    """The answer of an alpaca row (its output) or a chat row (its last turn, which must be the assistant's)."""
    if cfg.format == "alpaca":
        return row["output"]
    messages = row[cfg.messages_column]
    if not messages or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise GraftrError(f"{where}: the last message must be the assistant's answer to score it "
                          "(train.data.eval_metric)")
    return messages[-1]["content"]


def _with_answer(row: dict, answer: str, cfg: DataConfig) -> dict:
    """``row`` with its answer replaced by ``answer`` (the other columns as they are)."""
    if cfg.format == "alpaca":
        return {**row, "output": answer}
    messages = [dict(m) for m in row[cfg.messages_column]]
    messages[-1]["content"] = answer
    return {**row, cfg.messages_column: messages}


def _check_task(cfg: DataConfig, tokenizer, task: str) -> None:
    """Refuse a format that does not fit the task, and a tokenizer that cannot serve (the task has a pipeline)."""
    if cfg.format not in _FORMATS_BY_TASK[task]:
        raise GraftrError(f"data format '{cfg.format}' does not fit task '{task}' "
                          f"(use format {' or '.join(_FORMATS_BY_TASK[task])})")
    if task == "causal_lm":
        if tokenizer.eos_token_id is None:
            raise GraftrError(f"format '{cfg.format}' for causal_lm needs a tokenizer with an eos token")
        if not tokenizer.is_fast:
            raise GraftrError("causal_lm data needs a fast tokenizer (its offsets locate the learned tokens)")
    if cfg.format == "chat" and not tokenizer.chat_template:
        raise GraftrError("format 'chat' needs a tokenizer with a chat template and this one has none; "
                          "set tokenizer.chat_template or use format 'alpaca'")


def _ensure_pad_token(tokenizer) -> str | None:
    """Use eos as the pad token when there is none; returns a note saying so, or None."""
    if tokenizer.pad_token_id is not None:
        return None
    if tokenizer.eos_token is None:
        raise GraftrError("the tokenizer has neither a pad token nor an eos token; add a pad token to it")
    tokenizer.pad_token = tokenizer.eos_token
    return f"the tokenizer had no pad token; pad_token set to its eos token {tokenizer.eos_token!r}"


def _select_splits(raw: datasets.DatasetDict, source: str, cfg: DataConfig, seed: int,
                   notes: list[str]) -> list[tuple[str, datasets.Dataset]]:
    """The (description, dataset) pairs of the train split and of the eval split if there is one."""
    train_where = f"split '{cfg.train_split}' of {source}"
    train = raw[cfg.train_split]
    if len(train) == 0:
        raise GraftrError(f"{train_where} is empty")
    if cfg.limit is not None:
        train = train.select(range(min(cfg.limit, len(train))))
    splits = [(train_where, train)]
    if cfg.eval_split is not None and cfg.eval_split in raw:
        splits.append((f"split '{cfg.eval_split}' of {source}", raw[cfg.eval_split]))
        if cfg.eval_fraction is not None:
            notes.append(f"eval_fraction ignored: {source} has a '{cfg.eval_split}' split")
    elif cfg.eval_fraction is not None:
        train, evaluation = _carve(train, cfg.eval_fraction, seed, train_where)
        splits = [(train_where, train), (f"the eval_fraction part of {train_where}", evaluation)]
    for where, ds in splits[1:]:
        if len(ds) == 0:
            raise GraftrError(f"{where} is empty")
    return splits


def _carve(ds: datasets.Dataset, fraction: float, seed: int, where: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (train, eval) with a seeded shuffle; both keep the original order."""
    count = round(len(ds) * fraction)
    if not 0 < count < len(ds):
        raise GraftrError(f"eval_fraction {fraction} of the {len(ds)} examples of {where} leaves "
                          f"{'no eval' if count == 0 else 'no train'} example")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    return ds.select(sorted(order[count:])), ds.select(sorted(order[:count]))


def _fit(encode: Callable, ds: datasets.Dataset, where: str, cfg: DataConfig,
         notes: list[str]) -> tuple[list[dict], int]:
    """Encode ``ds`` and apply the ``overlong`` policy; returns the examples and the longest length seen."""
    examples = encode(ds, where, truncate=False)
    lengths = [_length(example) for example in examples]
    over = [i for i, length in enumerate(lengths) if length > cfg.max_length]
    if over and cfg.overlong == "error":
        raise GraftrError(f"example {over[0]} of {where} has {lengths[over[0]]} tokens, more than max_length "
                          f"{cfg.max_length} ({len(over)} such examples; set overlong: truncate or drop)")
    if over and cfg.overlong == "drop":
        if len(over) == len(examples):
            raise GraftrError(f"overlong: drop removed all {len(examples)} examples of {where} "
                              f"(max_length {cfg.max_length}, longest {max(lengths)})")
        dropped = set(over)
        examples = [example for i, example in enumerate(examples) if i not in dropped]
        notes.append(f"dropped {len(over)} of {len(lengths)} examples of {where} longer than {cfg.max_length} tokens")
    if over and cfg.overlong == "truncate":
        for i, example in zip(over, encode(ds.select(over), where, truncate=True)):
            examples[i] = example
        notes.append(f"truncated {len(over)} of {len(lengths)} examples of {where} to {cfg.max_length} tokens")

    learned = [e for e in examples if not isinstance(e["labels"], list) or any(t != IGNORE_INDEX for t in e["labels"])]
    if not learned:
        raise GraftrError(f"no example of {where} has a token to learn (no response or assistant turn "
                          f"within max_length {cfg.max_length})")
    if len(learned) < len(examples):
        notes.append(f"dropped {len(examples) - len(learned)} examples of {where} with no token to learn")
    return learned, max(lengths)


def _length(example: dict) -> int:
    labels = example["labels"]
    return max(len(example["input_ids"]), len(labels) if isinstance(labels, list) else 0)


def _encoder(cfg: DataConfig, tokenizer, task: str, names: list[str] | None, image_root: Path) -> Callable:
    """``encode(ds, where, truncate) -> examples`` for the format and task."""
    def encode(ds: datasets.Dataset, where: str, truncate: bool) -> list[dict]:
        limit = cfg.max_length if truncate else None
        if cfg.format == "classification":
            return _classification(ds, where, cfg, tokenizer, names, limit)
        if cfg.format == "chat":
            examples = _chat(ds, where, cfg, tokenizer, limit)
        elif cfg.format == "text":
            return _text(ds, where, cfg, tokenizer, limit)
        elif task == "seq2seq_lm":
            examples = _alpaca_seq2seq(ds, where, cfg, tokenizer, limit)
        else:
            examples = _alpaca_causal(ds, where, cfg, tokenizer, limit)
        if cfg.image_column is not None:
            for example, image in zip(examples, _images(ds, cfg.image_column, where, image_root)):
                example["image"] = image
        return examples
    return encode


def _image_root(source: str) -> Path:
    """The folder image paths are relative to: the data file's, the data directory itself, else the working one."""
    path = Path(source).expanduser()
    return (path if path.is_dir() else path.parent if path.is_file() else Path.cwd()).resolve()


def _images(ds: datasets.Dataset, column: str, where: str, root: Path) -> list[str]:
    """The absolute image path of every example; each must be an existing file."""
    paths = []
    for i, value in enumerate(_strings(ds, column, where)):
        path = root / value
        if not value or not path.is_file():
            raise GraftrError(f"example {i} of {where}: image {value!r} is not a file (image paths are relative to "
                              f"{root})")
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------------- formats


def _strings(ds: datasets.Dataset, column: str, where: str, optional: bool = False) -> list[str]:
    """The values of a string column; an optional column may be absent or hold nulls (read as "")."""
    if column not in ds.column_names:
        if optional:
            return [""] * len(ds)
        raise GraftrError(f"{where} has no column '{column}' (columns: {', '.join(ds.column_names)})")
    values = list(ds[column])
    for i, value in enumerate(values):
        if value is None and optional:
            values[i] = ""
        elif not isinstance(value, str):
            raise GraftrError(f"example {i} of {where}: column '{column}' holds {value!r} "
                              f"({type(value).__name__}), expected a string")
    return values


def _causal(ids: list[int], labels: list[int], eos: int, limit: int | None) -> dict:
    """A causal LM example ending in eos (appended unless the tokenizer added it), cut to ``limit`` tokens."""
    if ids and ids[-1] == eos:
        labels[-1] = eos
    else:
        ids, labels = ids + [eos], labels + [eos]
    ids, labels = ids[:limit], labels[:limit]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _learned(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the token id where the token overlaps one of the character ``spans``, else -100."""
    return [token if end > start and any(start < stop and end > begin for begin, stop in spans) else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets)]


def _alpaca_prompts(ds: datasets.Dataset, where: str, cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(prompts, outputs) of an alpaca split."""
    instructions = _strings(ds, "instruction", where)
    outputs = _strings(ds, "output", where)
    inputs = _strings(ds, "input", where, optional=True)
    prompts = [format_prompt({"instruction": instruction, "input": input_}, cfg.prompt_template)
               for instruction, input_ in zip(instructions, inputs)]
    return prompts, outputs


def _alpaca_causal(ds, where, cfg, tokenizer, limit) -> list[dict]:
    """prompt + output + eos; the prompt (and any special token the tokenizer adds) is not learned."""
    prompts, outputs = _alpaca_prompts(ds, where, cfg)
    full = [prompt + output for prompt, output in zip(prompts, outputs)]
    enc = tokenizer(full, return_offsets_mapping=True, return_token_type_ids=False)
    return [_causal(ids, _learned(ids, offsets, [(len(prompt), len(text))]), tokenizer.eos_token_id, limit)
            for prompt, text, ids, offsets in zip(prompts, full, enc["input_ids"], enc["offset_mapping"])]


def _alpaca_seq2seq(ds, where, cfg, tokenizer, limit) -> list[dict]:
    """Source = prompt, target = output, both tokenized as the tokenizer does (T5/BART append eos)."""
    prompts, outputs = _alpaca_prompts(ds, where, cfg)
    options = {"truncation": True, "max_length": limit} if limit else {}
    sources = tokenizer(prompts, return_token_type_ids=False, **options)
    targets = tokenizer(outputs, return_token_type_ids=False, **options)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}
            for ids, mask, labels in zip(sources["input_ids"], sources["attention_mask"], targets["input_ids"])]


def _text(ds, where, cfg, tokenizer, limit) -> list[dict]:
    """One document per example, ending in eos; every token is learned."""
    enc = tokenizer(_strings(ds, cfg.text_column, where), return_token_type_ids=False)
    return [_causal(ids, list(ids), tokenizer.eos_token_id, limit) for ids in enc["input_ids"]]


def _pack(ds, where, cfg, tokenizer, notes) -> tuple[list[dict], int]:
    """Join the documents (each ending in eos) and cut the stream into blocks of exactly max_length."""
    eos, size = tokenizer.eos_token_id, cfg.max_length
    stream, longest = [], 0
    for ids in tokenizer(_strings(ds, cfg.text_column, where), return_token_type_ids=False)["input_ids"]:
        ids = ids if ids and ids[-1] == eos else ids + [eos]
        stream += ids
        longest = max(longest, len(ids))
    count = len(stream) // size
    if count == 0:
        raise GraftrError(f"packing {where} gives no block: its {len(stream)} tokens are fewer than "
                          f"max_length {size}")
    if len(stream) > count * size:
        notes.append(f"packing dropped the last {len(stream) - count * size} tokens of {where}")
    blocks = [stream[i * size:(i + 1) * size] for i in range(count)]
    return [{"input_ids": block, "attention_mask": [1] * size, "labels": list(block)} for block in blocks], longest


def _chat(ds, where, cfg, tokenizer, limit) -> list[dict]:
    """Render each conversation with the chat template; only the assistant turns are learned."""
    if cfg.messages_column not in ds.column_names:
        raise GraftrError(f"{where} has no column '{cfg.messages_column}' (columns: {', '.join(ds.column_names)})")
    rendered = [_render_chat(messages, tokenizer, f"example {i} of {where}")
                for i, messages in enumerate(ds[cfg.messages_column])]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                    return_token_type_ids=False)
    examples = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = _learned(ids, offsets, spans)
        ids, labels = ids[:limit], labels[:limit]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def _render_chat(messages: Any, tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    An assistant turn spans from the end of the conversation before it rendered with the generation prompt to the
    end of the conversation up to and including it, so it holds the content and the template's end-of-turn text.
    """
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise GraftrError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    # Arrow gives every message every key seen in the column; drop the null ones so templates see the original.
    messages = [{key: value for key, value in m.items() if value is not None} for m in messages]

    def render(part: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)
        except Exception as error:  # jinja errors, templates that raise on role order
            raise GraftrError(f"the chat template failed on {where}: {_first_line(error)}") from error

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through)):
            raise GraftrError(f"the chat template does not render {where} incrementally (the conversation up to "
                              f"message {i} is not a prefix of the whole), so its assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def _label_names(splits: list[tuple[str, datasets.Dataset]], cfg: DataConfig, given: list | None) -> list[str]:
    """Class names: ``given``, else a ClassLabel's names, else the sorted strings or ``0..max`` of train + eval."""
    import datasets

    if given is not None:
        return [str(name) for name in given]
    feature = splits[0][1].features.get(cfg.label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = [value for where, ds in splits for value in _raw_labels(ds, where, cfg.label_column)]
    if all(isinstance(value, str) for value in values):
        return sorted(set(values))
    if all(isinstance(value, int) for value in values):
        return [str(i) for i in range(max(values) + 1)]
    raise GraftrError(f"label column '{cfg.label_column}' holds integers in one split and strings in another")


def _raw_labels(ds: datasets.Dataset, where: str, column: str) -> list[int | str]:
    """The label column, checked to hold only integers and strings."""
    if column not in ds.column_names:
        raise GraftrError(f"{where} has no column '{column}' (columns: {', '.join(ds.column_names)})")
    values = list(ds[column])
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise GraftrError(f"example {i} of {where}: label {value!r} ({type(value).__name__}) is not an "
                              "integer or a string")
    return values


def _classification(ds, where, cfg, tokenizer, names, limit) -> list[dict]:
    """Text (and text pair) with one class id; token_type_ids are kept when the tokenizer makes them."""
    labels = []
    for i, value in enumerate(_raw_labels(ds, where, cfg.label_column)):
        if isinstance(value, str) and value not in names:
            raise GraftrError(f"example {i} of {where}: label {value!r} is not one of the label names "
                              f"({', '.join(names)})")
        if isinstance(value, int) and not 0 <= value < len(names):
            raise GraftrError(f"example {i} of {where}: label {value} is outside 0..{len(names) - 1} "
                              f"(label names: {', '.join(names)})")
        labels.append(names.index(value) if isinstance(value, str) else value)
    texts = _strings(ds, cfg.text_column, where)
    pairs = _strings(ds, cfg.text_pair_column, where) if cfg.text_pair_column else None
    options = {"truncation": True, "max_length": limit} if limit else {}
    enc = tokenizer(texts, pairs, **options)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc]
    return [{**{key: enc[key][i] for key in keys}, "labels": label} for i, label in enumerate(labels)]


# --------------------------------------------------------------------------------------------- batching


class Collator:
    """Pads examples to the longest in the batch (right padding) and returns LongTensors.

    ``input_ids`` are padded with the tokenizer's pad token (eos when it has none), ``attention_mask`` and
    ``token_type_ids`` with 0, token ``labels`` with -100 to their own longest (seq2seq targets differ in length
    from the inputs); class labels become one tensor. ``pad_to_multiple_of`` rounds the padded lengths up.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None, image_processor=None):
        _ensure_pad_token(tokenizer)
        self.pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                           "labels": IGNORE_INDEX}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_processor = image_processor  # examples with an "image" path get pixel_values through it

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if key == "image":
                if self.image_processor is None:
                    raise GraftrError("the data has images (image_column) but the model takes none: its recipe "
                                      "has no vision: section")
                from graftr.vision import pixel_values

                batch["pixel_values"] = pixel_values(self.image_processor, values)
                continue
            batch[key] = (torch.tensor(values, dtype=torch.long) if isinstance(values[0], int)
                          else self._pad(values, self.pad_values[key]))
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out
