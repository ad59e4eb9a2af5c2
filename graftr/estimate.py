"""``graftr estimate RECIPE --model M [--nproc N] [path.to.field=value ...]``: a training run's memory per rank,
before any weight is read.

The model is built and grafted on the ``meta`` device (no memory, seconds even for 7B) in ``train.precision``, and
every figure is counted from it:

base parameters
    the frozen tensors in the training dtype, and a quantized base's packed weights as bitsandbytes stores them
    (:func:`graftr.quantize.stored_bytes`); ZeRO-3 partitions them over the ranks (``1/N`` each), stages 0-2
    keep them whole on every rank.
largest gathered layer (ZeRO-3)
    the parameters of the largest outlined layer, all-gathered while it runs (forward, and again for the recompute
    and the backward of a checkpointed layer).
adapter parameters, gradients, optimizer states
    DeepSpeed's mixed-precision accounting per trainable parameter: the model's copy in the training dtype (ZeRO-3:
    partitioned), its gradient in that dtype (ZeRO-2/3: partitioned), and the optimizer's fp32 master (bf16/fp16
    only) with AdamW's two fp32 moments (ZeRO-1/2/3: partitioned). With bf16/fp16 under ZeRO-2/3 the last three are
    what DeepSpeed's own ``estimate_zero2/3_model_states_mem_needs`` gives for the trainable parameters.
activations
    the bytes autograd holds for backward during one training forward of a micro batch of ``train.data.max_length``
    tokens, counted on ``meta`` from the grafted graph itself (saved-tensor hooks, each storage once, frozen weights
    excluded): without checkpointing, everything the forward saves; with ``activation_checkpointing: layers``, what
    the graph outside the layers saves, plus every layer's inputs, plus the largest one layer's saved tensors (the
    one being recomputed).
loss workspace
    the fused language-model loss computes the logits chunk by chunk into one fp32 buffer (at most 128 MiB), which
    is not saved for backward but lives through the step (:func:`graftr.loss.workspace_bytes`).

``graftr train`` prints the same line at start and the measured peak at its end (:mod:`graftr.train.memory`).
Not counted: the Python/torch/DeepSpeed process itself, data, DeepSpeed's communication buffers, and the
allocator's slack; the test compares the estimate with the measured peak on a small model (within 25 %).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch import nn

from graftr.names import torch_dtype


@dataclass
class Estimate:
    """Bytes per rank."""

    world: int
    zero_stage: int
    precision: str
    micro_batch_size: int
    seq_len: int
    base: int
    gathered_layer: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int  # without checkpointing
    activations_checkpointed: int
    checkpointing: str
    loss_workspace: int = 0  # the fused loss's logits chunk (graftr.loss.workspace_bytes)
    counts: dict = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.base + self.gathered_layer + self.adapter + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        act = self.activations_checkpointed if self.checkpointing == "layers" else self.activations
        return self.model_states + act + self.loss_workspace

    def line(self) -> str:
        """The one-line summary ``graftr train`` prints at start."""
        return (f"memory estimate per rank: {gib(self.total)} (base {gib(self.base)}, gathered layer "
                f"{gib(self.gathered_layer)}, adapters+grads+optimizer "
                f"{gib(self.adapter + self.gradients + self.optimizer)}, activations "
                f"{gib(self.activations_checkpointed if self.checkpointing == 'layers' else self.activations)} "
                f"with checkpointing {self.checkpointing}, loss workspace {gib(self.loss_workspace)}) × {self.world} "
                "rank(s)")

    def rows(self) -> list[tuple[str, str]]:
        c = self.counts
        split = f"/{self.world}" if self.world > 1 else ""
        return [
            ("base parameters", f"{gib(self.base)}  ({c['base']:,} frozen, {self.precision}"
                                + (f", {c['quantized']:,} of them quantized" if c.get("quantized") else "")
                                + (f", ZeRO-3 {split}" if self.zero_stage == 3 else ", whole on every rank") + ")"),
            *([("of which experts", f"{c['experts']:,} parameters in {c['expert_sites']} fused expert weights")]
              if c.get("experts") else []),
            ("largest gathered layer", f"{gib(self.gathered_layer)}  "
                                       + (f"({c['layer']}, {c['layer_params']:,} parameters)" if self.zero_stage == 3
                                          else "(ZeRO-3 only)")),
            ("adapter parameters", f"{gib(self.adapter)}  ({c['trainable']:,} trainable)"),
            ("gradients", gib(self.gradients)),
            ("optimizer states", f"{gib(self.optimizer)}  (AdamW moments"
                                 + (" + fp32 master" if self.precision != "fp32" else "") + ")"),
            ("activations, no checkpointing", f"{gib(self.activations)}  (micro batch {self.micro_batch_size} × "
                                               f"{self.seq_len} tokens)"),
            *([("of which routed rows", f"{gib(c['routed'])}  (tokens × top-k through the experts)")]
              if c.get("routed") else []),
            ("activations, checkpointing layers", gib(self.activations_checkpointed)),
            ("loss workspace", f"{gib(self.loss_workspace)}  (the fused loss's logits chunk)"),
            ("total per rank", f"{gib(self.total)}  (activation_checkpointing: {self.checkpointing})"),
            (f"total, {self.world} rank(s)", gib(self.total * self.world)),
        ]


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


class _Saved:
    """Bytes autograd saves for backward, per storage, attributed to the outlined layer running (or the root)."""

    def __init__(self, gm: nn.Module, routed_rows: int | None = None):
        self.routed_rows, self.routed = routed_rows, {}  # MoE: tensors of the (tokens × top-k) routed rows
        # the model's own tensors (weights, a quantized base's packed storage, rotary tables) are not activations
        self.excluded = {t.untyped_storage()._cdata for t in [*gm.parameters(), *gm.buffers()]}
        self.by_layer: dict[str, dict[int, int]] = {}
        self.inputs: dict[int, int] = {}
        self.current = ""

    def pack(self, t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s._cdata not in self.excluded:
                self.by_layer.setdefault(self.current, {})[s._cdata] = s.nbytes()
                if self.routed_rows and t.dim() and t.shape[0] == self.routed_rows:
                    self.routed[s._cdata] = s.nbytes()
        return t

    def pre(self, key):
        def hook(module, args):
            self.current = key
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    s = a.untyped_storage()
                    self.inputs[s._cdata] = s.nbytes()
        return hook

    def post(self, module, args, output):
        self.current = ""


def activations(gm, micro_batch: int, seq_len: int) -> tuple[int, int, int]:
    """(held for backward without checkpointing, with every layer checkpointed, of which the routed rows of
    Mixture-of-Experts layers) for one training forward of ``micro_batch`` × ``seq_len`` tokens, counted on
    ``meta``. Outlines ``gm``'s layers if they are not yet."""
    from graftr.outline import outline_layers

    top_k = None
    if not getattr(gm, "graftr_outlined", None):
        top_k = getattr(gm.hf_config.get_text_config(), "num_experts_per_tok", None) if gm.site_index.experts else None
        outline_layers(gm)
    saved = _Saved(gm, micro_batch * seq_len * top_k if top_k else None)
    handles = []
    for key in gm.graftr_outlined:
        layer = gm.get_submodule(key)
        handles += [layer.register_forward_pre_hook(saved.pre(key)), layer.register_forward_hook(saved.post)]
    ids = torch.full((micro_batch, seq_len), 3, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if "decoder_input_ids" in gm.graftr_input_names:
        inputs["decoder_input_ids"] = ids
    if "token_type_ids" in gm.graftr_input_names:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    if getattr(gm, "task", None) == "seq_cls":
        inputs["labels"] = torch.zeros(micro_batch, dtype=torch.long, device="meta")
    gm.train()
    from torch.fx.experimental import _config as fx_config

    try:  # the fused loss selects the scored tokens (nonzero): on meta, every token counts as scored
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            gm(**inputs)
    finally:
        for h in handles:
            h.remove()
    layer_bytes = {k: sum(v.values()) for k, v in saved.by_layer.items() if k}
    root = saved.by_layer.get("", {})
    everything: dict[int, int] = {}
    for per in saved.by_layer.values():
        everything.update(per)
    outside = {s: n for s, n in root.items() if not any(s in per for k, per in saved.by_layer.items() if k)}
    checkpointed = sum(outside.values()) + sum(n for s, n in saved.inputs.items() if s not in outside) \
        + max(layer_bytes.values(), default=0)
    return sum(everything.values()), checkpointed, sum(saved.routed.values())


def estimate(recipe, model_id: str, world: int = 1, seq_len: int | None = None) -> Estimate:
    """The per-rank memory of training ``recipe`` on ``model_id`` with ``world`` processes (nothing is read but
    the config), for micro batches of ``seq_len`` tokens (default: ``train.data.max_length``)."""
    from graftr.grafted import graft
    from graftr.materialize import build_empty
    from graftr.models import infer_task, resolve
    from graftr.sites import layer_of

    cfg = recipe.train
    source = resolve(model_id)
    task = recipe.task or infer_task(source.config)
    dtype = torch_dtype(cfg.precision)
    gm = graft(build_empty(source.config, task, dtype=dtype, num_labels=recipe.num_labels), recipe,
               model_id=source.model_id)
    gm.to("meta")  # the adapters of a meta base are built on the CPU (graftr.passes); counting needs shapes only
    unique = {id(p): (n, p) for n, p in gm.named_parameters()}.values()
    frozen = [(n, p) for n, p in unique if not p.requires_grad]
    trainable = [(n, p) for n, p in unique if p.requires_grad]
    n_base = sum(p.numel() for _, p in frozen)
    n_tr = sum(p.numel() for _, p in trainable)
    size = torch.finfo(dtype).bits // 8
    # a quantized base (the recipe's quantize:): its packed weights are buffers, counted as bitsandbytes stores them
    from graftr.quantize import stored_bytes, stored_numel

    packed, n_packed = stored_bytes(gm), stored_numel(gm)
    base_bytes = sum(p.numel() * p.element_size() for _, p in frozen) + packed
    n_base += n_packed
    stage, n = cfg.zero_stage, world
    layers: dict[str, int] = {}
    for name, p in unique:
        where = layer_of(name)
        if where is not None:
            key = f"{where[0]}.{where[1]}"
            layers[key] = layers.get(key, 0) + p.numel() * size
    largest = max(layers, key=layers.get) if layers else None
    states_dense = (n_tr * size, n_tr * size, n_tr * (8 + (4 if dtype != torch.float32 else 0)))
    adapter = states_dense[0] / (n if stage == 3 else 1)
    gradients = states_dense[1] / (n if stage >= 2 else 1)
    optimizer = states_dense[2] / (n if stage >= 1 else 1)
    if stage in (2, 3) and dtype != torch.float32 and cfg.offload == "none":
        # DeepSpeed's own accounting of the trainable parameters (2 + 18/N bytes each, ZeRO-2; 18/N, ZeRO-3; the
        # largest layer is counted below for the whole layer, base included)
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        if stage == 2:
            _, ds = estimate_zero2_model_states_mem_needs(n_tr, num_gpus_per_node=n, cpu_offload=False)
            adapter, rest = n_tr * size, ds - n_tr * size
        else:
            _, ds, _ = estimate_zero3_model_states_mem_needs(n_tr, 0, num_gpus_per_node=n, cpu_offload=False)
            adapter, rest = n_tr * size / n, ds
        # DeepSpeed's 18 bytes: 2 gradient (16-bit) + 4 gradient (fp32) + 4 master + 8 moments, all partitioned
        gradients, optimizer = rest * 6 / 18, rest * 12 / 18
    seq_len = seq_len or cfg.data.max_length
    if seq_len > gm.grafting.max_positions:
        from graftr.errors import GraftrError

        raise GraftrError(f"train.data.max_length {seq_len} is longer than {source.model_id}'s "
                          f"{gm.grafting.max_positions} positions; set train.data.max_length={gm.grafting.max_positions}"
                          " or less")
    experts = {s.weight for s in gm.site_index.experts} | {s.bias for s in gm.site_index.experts if s.bias}
    n_experts, expert_sites = sum(p.numel() for n, p in unique if n in experts), len(gm.site_index.experts)
    act_none, act_layers, routed = activations(gm, cfg.micro_batch_size, seq_len)
    return Estimate(world=n, zero_stage=stage, precision=cfg.precision, micro_batch_size=cfg.micro_batch_size,
                    seq_len=seq_len, base=int(base_bytes / (n if stage == 3 else 1)),
                    gathered_layer=layers[largest] if stage == 3 and largest else 0, adapter=int(adapter),
                    gradients=int(gradients), optimizer=int(optimizer), activations=act_none,
                    activations_checkpointed=act_layers, checkpointing=cfg.activation_checkpointing,
                    loss_workspace=gm.loss_workspace_bytes(cfg.micro_batch_size * seq_len),
                    counts={"base": n_base, "trainable": n_tr, "layer": largest, "quantized": n_packed,
                            "experts": n_experts, "routed": routed,
                            "expert_sites": expert_sites,
                            "layer_params": layers.get(largest, 0) // size if largest else 0})


# ---- the command ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe YAML with its train: section (overrides apply as for train)")
    parser.add_argument("--model", help="a model id, directory or config.json (only the config is read; default: "
                                        "the recipe's model)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) the run would use (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="path.to.field=value",
                        help="recipe overrides, e.g. train.zero_stage=3 train.precision=bf16")
    from graftr.cliargs import collect_overrides

    collect_overrides(parser)


def main(args) -> int:
    from rich.table import Table

    from graftr.console import console as out
    from graftr.errors import GraftrError
    from graftr.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.train is None:
        raise GraftrError(f"{args.recipe} has no train: section; add one or pass train.* overrides")
    if args.nproc < 1:
        raise GraftrError(f"--nproc must be >= 1, got {args.nproc}")
    model_id = args.model or recipe.model
    if not model_id:
        raise GraftrError("no model given: pass --model (a hub id, a model directory or a config.json)")
    est = estimate(recipe, model_id, args.nproc)
    table = Table(title=f"{recipe.name} on {model_id}: {args.nproc} rank(s), ZeRO-{est.zero_stage}, "
                        f"{est.precision}, micro batch {est.micro_batch_size} × {est.seq_len} tokens")
    table.add_column("per rank")
    table.add_column("memory", justify="left")
    for name, value in est.rows():
        table.add_row(name, value)
    out.print(table)
    out.print(est.line())
    return 0
