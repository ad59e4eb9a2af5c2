"""The recipe's ``quantize:``, ``vision:`` and ``train.data:`` sections: their configs, torch-free.

A recipe validates (``graftr validate``, ``graftr schema``) without importing torch; the passes that carry these
sections out are :mod:`graftr.quantize` (the frozen base stored in 4 or 8 bits), :mod:`graftr.vision` (the
image encoder and projection of multi-modal prompts) and :mod:`graftr.data` (the data pipeline), which re-export
these classes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from graftr.configmodel import ConfigModel


class QuantizeConfig(ConfigModel):
    """The recipe's ``quantize:`` section: how the frozen base's linear layers are stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["nf4", "fp4", "int8", "none"] = Field(
        description="nf4 / fp4: 4-bit blockwise (bitsandbytes), int8: row-wise 8-bit, none: full precision")
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype the quantized matmuls run in (input cast to it, output cast back); "
        "default: the model's dtype (train.precision, --dtype)")
    double_quant: bool = Field(False, description="4-bit only: quantize the per-block absmax too (QLoRA's double "
                                                  "quantization, ~0.37 bits/parameter less)")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="4-bit only: weights per absmax block")
    skip: list[str] = Field([], description="module path globs of linear layers kept in full precision (heads "
                                            "and embeddings are never quantized)")

    @field_validator("skip", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> Any:
        from graftr.selectors import compile_glob

        value = [value] if isinstance(value, str) else value
        for pattern in value if isinstance(value, list) else []:
            if isinstance(pattern, str):
                compile_glob(pattern)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizeConfig:
        if self.method == "int8":
            given = [f for f in ("double_quant", "blocksize") if f in self.model_fields_set]
            if given:
                raise ValueError(f"{' and '.join(given)} only apply to the 4-bit methods (nf4, fp4); int8 stores "
                                 "one scale per output row")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"


class VisionFeatures(ConfigModel):
    """Which global features of the encoder are projected (multi-scale: several layers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: Annotated[list[int], Field(min_length=1)] = Field(
        [-1], description="hidden-state indices of the encoder (0: the embeddings, n: after layer n, -1: the last)")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="cls: the class token (CLIP); mean: the mean over all tokens (SigLIP has no class token)")


class VisionConfig(ConfigModel):
    """The recipe's ``vision:`` section: the frozen encoder and the trainable projection to the model width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field(min_length=1, description="CLIP or SigLIP model (or vision tower): a directory, a hub id "
                         "in the local cache, or a bundled config snapshot (structure only)")
    features: VisionFeatures = Field(VisionFeatures(), description="the encoder's global features")
    hidden: int = Field(0, ge=0, description="hidden width of the projection MLP; 0: one Linear to the model width")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("gelu", description="σ of the projection MLP")


# The Stanford Alpaca templates exactly as in tatsu-lab/stanford_alpaca train.py (PROMPT_DICT).
PROMPT_TEMPLATES: dict[str, dict[str, str]] = {
    "alpaca": {
        "with_input": (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        ),
        "no_input": (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:"
        ),
    },
}

# Options that only some formats read; setting one for another format is an error rather than a silent no-op.
_FORMAT_OPTIONS = {
    "packing": ("text",),
    "text_column": ("text", "classification"),
    "text_pair_column": ("classification",),
    "label_column": ("classification",),
    "messages_column": ("chat",),
    "prompt_template": ("alpaca",),
    "image_column": ("alpaca", "chat"),
    "eval_metric": ("alpaca", "chat"),
    "choices_column": ("alpaca", "chat"),
}


class DataConfig(ConfigModel):
    """The ``data:`` part of a recipe's train section."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["alpaca", "chat", "text", "classification"] | None = None  # None: inferred from the columns
    train_split: str = "train"
    eval_split: str | None = "validation"  # None: no eval; a missing split is an error only when named explicitly
    max_length: int = Field(512, ge=1)  # tokens
    overlong: Literal["error", "truncate", "drop"] = "truncate"
    packing: bool = False  # text format only: concatenate the documents and cut them into max_length blocks
    text_column: str = "text"
    text_pair_column: str | None = None  # classification of pairs (GLUE style), e.g. "sentence2"
    label_column: str = "label"
    messages_column: str = "messages"
    prompt_template: str = "alpaca"  # a key of PROMPT_TEMPLATES
    image_column: str | None = None  # alpaca/chat: a column of image file paths, relative to the data file's folder
    eval_fraction: float | None = Field(None, gt=0, lt=1)  # carve a seeded eval split out of train if none exists
    limit: int | None = Field(None, ge=1)  # keep only the first N train examples (before any eval_fraction carve)
    # the held-out metric beside the loss (alpaca/chat, causal LMs): choice = accuracy by answer likelihood over
    # each row's choices_column (the reference is the output / last assistant turn); exact_match = the greedy
    # answer equals the reference (stripped); auto = choice when the eval split has the choices column, else none
    eval_metric: Literal["auto", "none", "choice", "exact_match"] = "auto"
    choices_column: str = "choices"

    @model_validator(mode="after")
    def _check_options(self) -> DataConfig:
        # by value, not by whether the field was written: a resolved recipe (every default written out) reads back
        fields = type(self).model_fields
        for option, formats in _FORMAT_OPTIONS.items():
            if self.format is not None and getattr(self, option) != fields[option].default and \
                    self.format not in formats:
                raise ValueError(f"{option} applies to format {' or '.join(formats)} only, not {self.format}")
        if self.packing and self.overlong != fields["overlong"].default:
            raise ValueError("overlong does not apply with packing (blocks are exactly max_length)")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt_template {self.prompt_template!r} (known: {', '.join(PROMPT_TEMPLATES)})")
        if self.eval_fraction is not None and self.eval_split is None:
            raise ValueError("eval_fraction carves an eval split but eval_split is null (no eval); choose one")
        return self
