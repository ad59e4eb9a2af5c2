"""The ``train:`` section of a recipe and the DeepSpeed config built from it (overrides: :mod:`graftr.recipe`).

::

    train:
      max_steps: 60              # or epochs: 3 (max_steps wins when both are given)
      micro_batch_size: 16       # per process and micro-batch; global batch = this × accumulation × processes
      lr: 3.0e-3
      zero_stage: 2
      data: {format: classification, text_column: sentence, max_length: 64}

Every field has a default, so a recipe without a ``train:`` section trains too: the data format is inferred from
the data's columns (:func:`graftr.data.infer_format`), the length is 3 epochs (HF Trainer's default), and ``lr``,
``lr_schedule``, warmup and ``weight_decay`` left unset come from the adapter kind's paper or official code
(:class:`graftr.registry.TrainingDefaults`, resolved by :func:`resolve_defaults` once the global batch is known).

Optimizer and schedule are built by graftr, not by DeepSpeed: ``torch.optim.AdamW`` (weight decay on matrices
only) and a ``LambdaLR`` warmup + decay are handed to ``deepspeed.initialize`` as client objects. That needs no
compiled DeepSpeed op (DeepSpeed's own ``AdamW`` would JIT-build ``cpu_adam``/``fused_adam``), runs the same under
every ZeRO stage on CPU and GPU, and DeepSpeed still steps the scheduler at accumulation boundaries and saves both
in its checkpoints. With ``offload`` the same AdamW runs on the offloaded CPU partitions (DeepSpeed's
``zero_force_ds_cpu_optimizer`` check is turned off for it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from graftr.configmodel import ConfigModel
from graftr.sections import DataConfig
from graftr.errors import GraftrError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_EPOCHS = 3  # when neither max_steps nor epochs is set (HF Trainer's num_train_epochs default)
# AdamW's first step moves a parameter by lr / (1 - beta1) = 10 lr, a float32 in the update: a larger lr overflows
# inside the optimizer (torch raises at step 1) instead of training.
MAX_LR = 3.4028234663852886e38 * (1 - 0.9)
# DeepSpeed keys graftr sets from the recipe and also reads itself (batching, optimizer, schedule, the ZeRO stage
# that decides outlining and compile): a user JSON may not change them, or graftr and the DeepSpeed engine would
# disagree. Dotted keys are nested.
_OWNED = {
    "train_batch_size": "micro_batch_size × gradient_accumulation_steps × processes",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "optimizer": "train.lr and train.weight_decay (graftr passes torch AdamW to DeepSpeed)",
    "scheduler": "train.lr_schedule and train.warmup_steps (graftr passes its LambdaLR to DeepSpeed)",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "zero_optimization.stage": "train.zero_stage",
}


class TrainConfig(ConfigModel):
    """How to train a recipe's adapters (the recipe's ``train:`` section)."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig,
                             description="the data pipeline: format (default: inferred from the columns), columns, "
                             "splits, max_length")
    lr: float | None = Field(None, gt=0, description="peak learning rate (after warmup); default: the adapter "
                             "kind's, from its paper or official code")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to run; wins over epochs")
    epochs: int | None = Field(None, ge=1, description="passes over the train split (used when max_steps is unset; "
                               f"default {DEFAULT_EPOCHS} when neither is set)")
    micro_batch_size: int = Field(8, ge=1, description="examples per process and forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay after warmup: constant, linear to 0, or cosine to 0 (default: the adapter "
        "kind's, else linear)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from lr/warmup_steps to lr")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warmup as a fraction of all steps "
                                       "(instead of warmup_steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay, applied to matrices only "
                                "(never to vectors: biases, norms, IA³ scales, gates)")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables")
    seed: int = Field(0, description="seeds adapter init, data order and dropout")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compute dtype of the model; optimizer master weights stay fp32 (fp16: GPUs only)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (and always at the end); 0: end only")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (and at the end); 0: no checkpoints")
    log_every: int = Field(10, ge=1, description="print and record the mean loss every N steps")
    samples: int = Field(4, ge=0, description="held-out prompts answered greedily before and after training (a "
                         "causal LM on alpaca or chat data; the summary shows the first); 0: none")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also parameters")
    offload: Literal["none", "optimizer", "optimizer_and_params"] = Field(
        "none", description="move optimizer states (ZeRO >= 1) and parameters (ZeRO-3) to CPU memory")
    deepspeed_config: str | None = Field(
        None, description="a DeepSpeed JSON merged over the generated config (path relative to the working dir)")
    compile: bool = Field(False, description="torch.compile the rewritten graph (dynamic shapes; not with ZeRO-3)")
    outline_layers: bool | Literal["auto"] = Field(
        "auto", description="run each layer as its own submodule so ZeRO-3 gathers one layer at a time; "
        "auto: with ZeRO-3 or activation checkpointing")
    return_freed_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="CPU only: give freed activations back to the system at once (glibc's mmap threshold "
        "fixed at 128 KiB: less peak memory, but a page fault per 4 KiB of every large tensor on every step); auto: "
        "when graftr's memory estimate exceeds half the memory available, or the model has 3B parameters or more")
    activation_checkpointing: Literal["none", "layers"] = Field(
        "none", description="layers: recompute each decoder layer in backward instead of keeping its activations "
        "(dropout masks restored: same results, less memory, one more forward per step)")

    @field_validator("lr")
    @classmethod
    def _lr_fits_the_optimizer(cls, lr: float | None) -> float | None:
        if lr is not None and lr > MAX_LR:
            raise ValueError(f"lr {lr:g} overflows AdamW: its first step moves a parameter by 10 × lr, which must be "
                             f"a float32 (lr at most {MAX_LR:.3g})")
        return lr

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_ratio is not None and self.warmup_steps:  # by value: a resolved recipe writes both out
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(f"offload: {self.offload} needs zero_stage 1, 2 or 3 (stage 0 keeps no partitions)")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError("offload: optimizer_and_params needs zero_stage 3 (only ZeRO-3 partitions parameters)")
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile does not work with zero_stage 3: ZeRO-3 gathers parameters while the graph "
                             "runs, which torch.compile cannot trace; use zero_stage 0-2 or compile: false")
        if self.activation_checkpointing == "layers" and self.outline_layers is False:
            raise ValueError("activation_checkpointing: layers recomputes outlined layers; it needs outline_layers "
                             "true or auto")
        return self

    def outline(self) -> bool:
        """Whether the layers are outlined: ``auto`` means under ZeRO-3, where it saves memory, or with activation
        checkpointing, which recomputes outlined layers."""
        if self.outline_layers == "auto":
            return self.zero_stage == 3 or self.activation_checkpointing == "layers"
        return bool(self.outline_layers)

    def notes(self) -> list[str]:
        """Options that have no effect as set (torchtitan's rule: never ignore an option silently)."""
        notes = []
        if self.max_steps is not None and self.epochs is not None:
            notes.append(f"train.epochs ({self.epochs}) is ignored: train.max_steps ({self.max_steps}) wins")
        if self.save_every == 0 and "keep_checkpoints" in self.model_fields_set:
            notes.append("train.keep_checkpoints has no effect: save_every is 0, so no checkpoint is written")
        if self.outline_layers is True and self.zero_stage != 3 and self.activation_checkpointing == "none":
            notes.append("train.outline_layers: true only changes what ZeRO-3 gathers; with zero_stage "
                         f"{self.zero_stage} the layers are still outlined but nothing is saved")
        return notes


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set, else ``epochs`` (default 3) full passes."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return (cfg.epochs or DEFAULT_EPOCHS) * steps_per_epoch


# the fields a kind's TrainingDefaults fill when the recipe leaves them unset
_DEFAULTED = ("lr", "lr_schedule", "weight_decay")


def resolve_defaults(cfg: TrainConfig, adapter_configs: list, global_batch: int) -> tuple[TrainConfig, str | None]:
    """``cfg`` with the unset ``lr``, ``lr_schedule``, warmup and ``weight_decay`` taken from the recipe's adapter
    kinds (:class:`graftr.registry.TrainingDefaults`), and a note naming what was taken and from where (None when the
    recipe set ``lr`` and nothing was taken).

    Kinds with different defaults, or none with any, need ``train.lr`` (an error says so); a kind without defaults
    beside kinds that have them trains with theirs (LLaMA-Adapter V2's scale_bias with the gated prompts').
    """
    unset = [name for name in _DEFAULTED if name not in cfg.model_fields_set]
    warmup_unset = "warmup_steps" not in cfg.model_fields_set and "warmup_ratio" not in cfg.model_fields_set
    if cfg.lr is not None and not unset and not warmup_unset:
        return cfg, None
    by_kind = {type(c).model_fields["kind"].default: type(c).training_defaults for c in adapter_configs}
    missing = sorted(name for name, d in by_kind.items() if d is None)
    known = {d for d in by_kind.values() if d is not None}
    if not known:
        if cfg.lr is None:
            raise GraftrError(f"adapter kind {', '.join(map(repr, missing))} has no default learning rate: set "
                              "train.lr in the recipe or pass train.lr=VALUE")
        return cfg, None
    if len(known) > 1:
        if cfg.lr is None:
            raise GraftrError("the recipe's adapter kinds train with different default learning rates ("
                              + ", ".join(f"{name} {d.lr:g}" for name, d in sorted(by_kind.items()) if d)
                              + "): set train.lr in the recipe or pass train.lr=VALUE")
        return cfg, None  # lr given; the generic defaults of the other fields apply
    # one set of defaults; a kind without its own (scale_bias beside LLaMA-Adapter's prompts) trains with it
    defaults = known.pop()
    update: dict[str, Any] = {name: getattr(defaults, name) for name in unset if name != "lr"}
    if cfg.lr is None:
        update["lr"] = defaults.lr_for(global_batch)
    if warmup_unset:
        update["warmup_ratio"] = defaults.warmup_ratio
    resolved = type(cfg).model_validate({**cfg.model_dump(exclude_unset=True), **update})
    kind = ", ".join(sorted(name for name, d in by_kind.items() if d is not None))
    what = "defaults" if cfg.lr is None else "schedule defaults (train.lr is the recipe's)"
    others = f" ({', '.join(missing)} {'has' if len(missing) == 1 else 'have'} none of its own)" if missing else ""
    return resolved, f"{kind} {what}{others}: {defaults.describe(global_batch, lr=cfg.lr is None)}"


def warmup(cfg: TrainConfig, total: int) -> int:
    return math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else cfg.warmup_steps


def lr_factor(step: int, *, warmup_steps: int, total: int, schedule: str) -> float:
    """The multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, then the decay.

    Warmup reaches the full lr at its last step (``(step + 1) / warmup_steps``), so no step runs at lr 0; the decay
    goes from 1 at the first step after warmup towards 0 after the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``world_size`` processes (before a user JSON is merged in)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # DeepSpeed would replace torch.nn.functional.linear process-wide (a memory saving for eager modules);
        # the traced graph calls aten.linear directly, so it gains nothing and later traces would break.
        zero["memory_efficient_linear"] = False
        # one layer's parameters gathered at a time, as graftr estimate counts: DeepSpeed's default keeps a
        # gathered parameter until it is used again if that is within 1e9 parameters of work (the last layers' from
        # forward to backward: ~2 GB of Llama-2-7B in bf16); a layer is gathered again for its backward instead
        zero["stage3_max_reuse_distance"] = 0
    if cfg.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # dynamic loss scaling (loss_scale 0) starting at 2^16, as DeepSpeed recommends
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # torch AdamW on offloaded partitions (see the module docstring)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # graftr logs; DeepSpeed's own step lines would interleave with the bar
        "wall_clock_breakdown": False,
    }


_ABSENT = object()


def _lookup(config: Any, key: str) -> Any:
    """``config["a"]["b"]`` for the key ``"a.b"``, or ``_ABSENT``."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return _ABSENT
        config = config[part]
    return config


def merge_user_config(generated: dict[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
    """Merge the JSON at ``path`` over ``generated``; returns the result and one note per replaced value.

    Keys graftr reads itself (batch sizes, accumulation, optimizer, scheduler, precision, ZeRO stage) must come from
    the recipe; giving them a different value in the JSON is an error naming the recipe field to set instead.
    """
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GraftrError(f"train.deepspeed_config: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GraftrError(f"train.deepspeed_config: cannot read {path} as JSON: {e}") from None
    if not isinstance(user, dict):
        raise GraftrError(f"train.deepspeed_config: {path} must hold a JSON object")
    for key, field in _OWNED.items():
        if _lookup(user, key) is not _ABSENT and _lookup(user, key) != _lookup(generated, key):
            raise GraftrError(f"train.deepspeed_config: {path} sets {key!r}; graftr derives it from {field}, "
                              "set that in the recipe instead")
    notes: list[str] = []

    def merge(base: dict, extra: dict, where: str) -> dict:
        out = dict(base)
        for key, value in extra.items():
            name = f"{where}{key}"
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, name + ".")
            elif key in out and out[key] != value:
                notes.append(f"{path} overrides {name}: {json.dumps(out[key])} -> {json.dumps(value)}")
                out[key] = value
            else:
                out[key] = value
        return out

    return merge(generated, user, ""), notes
