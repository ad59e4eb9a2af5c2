"""The configs of the built-in adapter kinds: the recipe's ``adapter:`` mapping of each kind, torch-free.

Each kind's module (equation, parameters, merge, PEFT conversion) is its own file beside this one —
:mod:`graftr.adapters.ia3`, :mod:`~graftr.adapters.ina`, :mod:`~graftr.adapters.gated_prompt`,
:mod:`~graftr.adapters.scale_bias` — and registers itself with the config below (:func:`graftr.registry.register_adapter`).
The configs live apart so a recipe validates (``graftr validate``, ``graftr schema``) without importing torch, as
PEFT keeps ``tuners/<method>/config.py`` apart from its layers. A user's kind may keep both in one file.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from graftr.registry import AdapterConfig, TrainingDefaults


class IA3Config(AdapterConfig):
    # T-Few (r-three/t-few configs/ia3.json and src/utils/Config.py): lr 3e-3, linear decay with 6% warmup, no decay
    training_defaults = TrainingDefaults(lr=3e-3, lr_schedule="linear", warmup_ratio=0.06,
                                         source="IA³'s T-Few recipe (Liu et al. 2022)")
    kind: Literal["ia3"] = "ia3"
    scale: Literal["output", "input"] = "output"
    """``output`` for attention-type sites, ``input`` for feed-forward sites (PEFT's ``feedforward_modules``)."""


class InAConfig(AdapterConfig):
    # The official GLUE commands (InA_GLUE.batch: run_glue.py without --learning_rate) train with HF
    # TrainingArguments' defaults: lr 5e-5, linear decay, no warmup, no weight decay. That rate barely moves a
    # LoRA-type branch in a short run (SmolLM2-135M, sentiment, 40 steps: eval loss 1.10 -> 0.95; at 5e-4 -> 0.11,
    # docs/results.md), so graftr's default is LoRA practice for short runs, with the rest as the paper's.
    training_defaults = TrainingDefaults(
        lr=5e-4, lr_schedule="linear",
        source="LoRA practice for short runs (QLoRA trains 7B at 2e-4, small models take more); schedule as InA's "
               "official GLUE commands",
        paper="train.lr=5e-5 (InA's GLUE commands: run_glue.py with HF Trainer's default)")
    kind: Literal["ina"] = "ina"
    rank: int = Field(8, ge=1, description="r, the inner dimension")
    alpha: float = Field(16, gt=0, description="the branch is scaled by s = alpha / rank")
    inhibition: float = Field(0.3, ge=0, le=1, description="p; 0 is plain LoRA (no threshold, no activation)")
    activation: Literal["leaky_relu", "gelu", "relu", "silu", "tanh", "identity"] = Field(
        "leaky_relu", description="f; leaky_relu (slope 0.01) as the official code, gelu as the paper text")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input x")
    init: Literal["lora", "gaussian"] = Field("lora", description="A kaiming-uniform (lora) or N(0, 1/r²); B zeros")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of A, B and the branch")

    @model_validator(mode="after")
    def _warn_unused_activation(self) -> InAConfig:
        if self.inhibition == 0 and self.activation != "leaky_relu":
            warnings.warn(f"ina: activation {self.activation!r} has no effect with inhibition 0 (plain LoRA, "
                          "no activation, as in the official code)", UserWarning, stacklevel=2)
        return self


_EMBEDDING_DIM = {"hypernetwork": 64, "shared_mlp": 256}  # the official code's widths of E and of the table rows
_GENERATOR_FIELDS = ("embedding_dim", "hidden", "activation")


class GatedPromptConfig(AdapterConfig):
    # the official Alpaca run (LLaMA-Adapter alpaca_finetuning_v1, finetuning.py and util/lr_sched.py; the same in
    # Diep et al.'s finetune_llama_non_linear.sh): base lr 9e-3 scaled by batch/256, 2 warm-up epochs of 5 then a
    # half-cycle cosine to 0, AdamW weight decay 0.02
    training_defaults = TrainingDefaults(lr=9e-3, per_batch=256, lr_schedule="cosine", warmup_ratio=0.4,
                                         weight_decay=0.02, source="LLaMA-Adapter's official Alpaca run")
    kind: Literal["gated_prompt"] = "gated_prompt"
    length: int = Field(10, ge=1, description="L, prompt tokens per attention block")
    prompt: Literal["linear", "hypernetwork", "shared_mlp"] = Field(
        "linear", description="linear: a parameter per block; hypernetwork / shared_mlp: one generator per rule")
    embedding_dim: int | None = Field(
        None, ge=1, description="hypernetwork: width of the layer embedding E (default 64); shared_mlp: width of "
        "the prompt table rows (default 256)")
    hidden: int = Field(64, ge=0, description="hidden width h of the generator MLP; 0: one layer, σ(W2·x + b2)")
    activation: Literal["relu", "leaky_relu", "gelu", "tanh", "sigmoid"] = Field(
        "relu", description="σ of the generator MLP (leaky_relu has slope 0.1, as the official code)")
    gate: Literal["per_head_tanh", "scalar", "adapt"] = Field(
        "per_head_tanh", description="per_head_tanh: tanh(g_h); scalar: one g, no tanh (PEFT); adapt: tanh(q·w_h)")
    mode: Literal["gated", "prefix"] = Field(
        "gated", description="gated: separate softmax + zero-init gate; prefix: prompts join the tokens' softmax")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the parameters")
    condition: Literal["none", "image"] = Field(
        "none", description="image: the recipe's vision: vector I_p is added to every prompt (LLaMA-Adapter §3.3)")

    @model_validator(mode="before")
    @classmethod
    def _default_embedding_dim(cls, data):
        if isinstance(data, dict) and data.get("embedding_dim") is None and data.get("prompt") in _EMBEDDING_DIM:
            data = {**data, "embedding_dim": _EMBEDDING_DIM[data["prompt"]]}
        return data

    @model_validator(mode="after")
    def _image_needs_gates(self) -> GatedPromptConfig:
        if self.condition == "image" and self.mode != "gated":
            raise ValueError("condition: image needs mode: gated (the zero-init gates keep the model unchanged at "
                             "start for any image; prefix attention has no gate)")
        return self

    @model_validator(mode="after")
    def _warn_unused(self) -> GatedPromptConfig:
        """Options changed from their defaults that do nothing (a dumped recipe writes the defaults out)."""
        fields = type(self).model_fields
        changed = [f for f in (*_GENERATOR_FIELDS, "gate") if getattr(self, f) != fields[f].default]
        unused = [f for f in changed if f != "gate"] if self.prompt == "linear" else []
        if self.mode == "prefix" and "gate" in changed:
            unused.append("gate")
        if unused:
            warnings.warn(f"gated_prompt: {', '.join(unused)} ha{'s' if len(unused) == 1 else 've'} no effect with "
                          f"prompt {self.prompt!r} and mode {self.mode!r}", UserWarning, stacklevel=2)
        return self


class ScaleBiasConfig(AdapterConfig):
    kind: Literal["scale_bias"] = "scale_bias"


BUILTIN = (IA3Config, InAConfig, GatedPromptConfig, ScaleBiasConfig)  # module of each: graftr.adapters.<kind>
