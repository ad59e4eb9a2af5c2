"""Merging: fold a trained adapter into the base weights and write a plain Hugging Face model directory.

``graftr merge ADAPTER --model MODEL --out DIR`` loads the base with its weights, grafts and loads the adapter,
folds every adapter into its site's weight (:meth:`GraftedModel.merge_`: IA³ exactly, InA only with p = 0) and
saves the HF model with the merged weights through its own ``save_pretrained``, with its config (label names
included) and the tokenizer files of the source. Parameter names do not change, so the tensors of the recipe's
``trainable_modules`` (a trained classifier head) come along. The directory loads with ``from_pretrained`` in an
environment without graftr.

Everything that can refuse does so before anything is written: an adapter kind that cannot be merged (the
message says why; read from the adapter's recipe or PEFT config before any base weight is), an adapter on a weight
tied to another one (merging would change both), a mismatched base.

The output directory is written atomically (:func:`graftr.formats.files.write_dir_atomically`); an existing
non-empty directory is replaced only with ``--force`` and only if it holds a ``config.json`` (an earlier merged
model), which is checked before any weight is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graftr import quantize
from graftr.errors import ATTENTION_NOT_MERGEABLE, GraftrError, MergeError
from graftr.load import Base, Loaded, add_trust_argument
from graftr.names import DTYPES, torch_dtype

def merge_into_hf(loaded: Loaded) -> nn.Module:
    """Merge ``loaded.gm``'s adapters and return ``loaded.model`` (the HF model) holding the merged weights."""
    gm, hf = loaded.gm, loaded.model
    tied = quantize.tied_names(hf)
    for site in gm.site_index.all():
        if site.adapters and site.op == "linear" and site.weight in tied:
            raise MergeError(f"{site.path}: its weight {site.weight} is tied to another module's weight; "
                             "merging would change both")
    gm.merge_()
    state = gm.state_dict()
    expected = hf.state_dict()
    gained = [name for name in state if name not in expected and name.endswith(".bias")
              and bool(state[name].any())]
    if gained:
        raise MergeError(f"merging gives {gained[0]} (and {len(gained) - 1} more) a bias, but {type(hf).__name__} "
                         "has no bias there to hold it (scale_bias adds a bias to a bias-free linear); keep the "
                         "adapter and load it with graftr instead")
    missing = [name for name in expected if name not in state and name not in tied]
    if missing:
        raise MergeError(f"the merged graph lacks {len(missing)} tensors of {type(hf).__name__}: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if name in state:
                tensor.copy_(state[name])
    return hf


def merge_refusal(gm) -> str | None:
    """Why :meth:`GraftedModel.merge_` would refuse the loaded ``gm`` (its first site that cannot be merged, one
    line), else None; changes nothing (the check :class:`graftr.grafted.MergeAdapters` runs before merging)."""
    from graftr.grafted import MergeAdapters

    try:
        MergeAdapters().requires(gm)
    except MergeError as e:
        return str(e)
    return None


def refusal_before_loading(base: Base) -> str | None:
    """Why the adapter that ``base`` was resolved for cannot be merged, as far as its recipe (or PEFT config) tells,
    else None: ``graftr merge`` refuses before it reads gigabytes of base weights for nothing.
    :meth:`GraftedModel.merge_` still checks every site of the grafted model."""
    from pydantic import ValidationError

    from graftr import registry
    from graftr.formats.peft import peft_adapters

    if base.peft is not None:
        adapters = [(f"PEFT {base.peft.get('peft_type')} adapter", data) for data in peft_adapters(base.peft)]
    else:
        adapters = [(f"rule {rule.name!r}", rule.adapter.model_dump()) for rule in base.recipe.rules]
    for what, data in adapters:
        try:
            kind = registry.get_kind(data["kind"])
        except GraftrError:
            continue
        if "linear" not in kind.ops:
            return f"{what} ({kind.name}) attaches to attention blocks: {ATTENTION_NOT_MERGEABLE}"
        try:
            config = kind.config_cls.model_validate(data)
        except ValidationError:
            continue
        if (reason := kind.module_cls.merge_refusal(config)) is not None:
            return f"{what}: {reason}"
    return None


def save_merged(hf: nn.Module, source, out: Path, dtype: torch.dtype, *, force: bool = False) -> None:
    """Write ``hf`` (cast to ``dtype``) with config, generation config and the source's tokenizer files."""
    from graftr.formats.files import write_dir_atomically
    from graftr.models import stored_tokenizer

    tokenizer = stored_tokenizer(source)
    hf.to(dtype)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir_atomically(out, write, marker="config.json", force=force)


def _quantized_output_dtype(config, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model merged from a quantized base (``--dtype auto``): the quantized matmuls' compute dtype
    if 16-bit, else the base's own if 16-bit, else bfloat16."""
    compute = torch_dtype(config.compute_dtype) if config.compute_dtype else None
    for dtype in (compute, base_dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return torch.bfloat16


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument("adapter", help="a graftr adapter directory")
    parser.add_argument("--model", help="base model directory with weights (or a cached hub id); "
                                        "default: the base recorded in the adapter")
    parser.add_argument("--out", required=True, help="the HF model directory to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds an earlier merged model")
    add_trust_argument(parser)
    parser.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto",
                        help="dtype of the saved weights; auto (default): the base's own dtype (a quantized base: "
                             "16-bit, see docs/quantized_base.md). Merging is in fp32")


def main(args) -> int:
    from rich.table import Table

    from graftr.console import console
    from graftr.formats.files import check_out
    from graftr.load import load_with_weights, resolve_base

    check_out(Path(args.out), "config.json", force=args.force)  # before reading gigabytes of weights
    base = resolve_base(args.model, args.adapter, weights=True, console=console, trust_code=args.trust_code)
    if (reason := refusal_before_loading(base)) is not None:
        raise MergeError(reason)
    # a quantized base: the adapter was trained against dequantize(quantize(W)); merge into those weights, as PEFT
    # merges into a 4-bit base's dequantized weights, and write them in 16 bits
    quantized = quantize.active(getattr(base.recipe, "quantize", None))
    loaded = load_with_weights(base, args.adapter, dtype=torch.float32, round_trip=quantized)
    plans = [(p.name, p.rule.adapter.kind, len(p.sites)) for p in loaded.gm.plans]
    round_tripped = len(loaded.gm.graftr_quantized)
    hf = merge_into_hf(loaded)
    dtype = _config_dtype(loaded.source.config) if args.dtype == "auto" else torch_dtype(args.dtype)
    if quantized and args.dtype == "auto":
        dtype = _quantized_output_dtype(base.recipe.quantize, dtype)
    save_merged(hf, loaded.source, Path(args.out), dtype, force=args.force)
    table = Table(title=f"merged {args.adapter} into {loaded.source.model_id}")
    for col in ("rule", "kind", "sites"):
        table.add_column(col)
    for name, kind, sites in plans:
        table.add_row(name, kind, str(sites))
    console.print(table)
    if quantized:
        console.print(f"the base was quantized ({base.recipe.quantize.method}) when the adapter was trained: merged "
                      f"into the dequantized weights of {round_tripped} linear layers and written as "
                      f"{str(dtype).removeprefix('torch.')} (the merged model is not quantized)")
    console.print(f"wrote {type(hf).__name__} ({str(dtype).removeprefix('torch.')}) to {args.out}; "
              "it loads with transformers' from_pretrained, without graftr")
    return 0

