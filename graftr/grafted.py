"""The grafted model: a traced HF model with adapters inserted, called like the HF model it came from.

:class:`GraftedModel` is a ``torch.fx.GraphModule`` whose parameters keep their HF names (adapter parameters are
named ``<site path>.<rule name>.<param>``). Calling it takes the HF model's keyword arguments and returns the HF
output type (:mod:`graftr.calling`); ``labels`` are turned into a loss outside the graph with transformers' own loss
functions, so one traced graph serves training and inference. ``.train()``/``.eval()`` switch every dropout,
adapters' included. It holds named adapters (:mod:`graftr.named`): ``add_adapter``, ``set_adapter``,
``active_adapters``, ``delete_adapter``, ``disable_adapter()``, with PEFT's names and meaning.

This is the core. The Hugging Face face, ``transformers.PreTrainedModel`` with ``save_pretrained``,
``from_pretrained``, ``load_adapter`` and ``generate``, is :class:`graftr.hf.GraftedModel`, a subclass built above
the formats and loaders it calls: :func:`graftr.graft`, :func:`graftr.prepare` and :func:`graftr.load_adapter` make
one (pass ``cls`` to :func:`prepare`/:func:`graft` here to choose the class).

In training mode, a language model whose logits come from a frozen linear head computes its loss with
:func:`graftr.loss.linear_cross_entropy` instead: the graph runs up to the head's input, and the (tokens × vocab)
logits are never kept for backward. Such a call returns ``loss`` with ``logits=None`` (set
``model.fused_loss = False`` to get the logits in training too); in eval mode the logits are always returned.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from graftr import named, passes, trace as tracing
from graftr.calling import adopt_signature, bind_forward, hf_forward, keep_logits
from graftr.errors import ATTENTION_NOT_MERGEABLE, GraftrError, MergeError
from graftr.loss import IGNORE_INDEX, Scratch, linear_cross_entropy
from graftr.named import DEFAULT, NamedAdapter
from graftr.passbase import GraphPass, PassResult, run_passes
from graftr.sites import find_sites

_LM_LOSS_SHIFT = {"causal_lm": True, "masked_lm": False, "seq2seq_lm": False}  # tasks whose loss can be fused


@dataclass
class Grafting:
    """What tracing and grafting produced: the one record a :class:`GraftedModel` keeps (``gm.grafting``).

    The fields are also the model's attributes of the same meaning (``gm.task``, ``gm.site_index``,
    ``gm.graftr_input_names``, ...), read and set through it. A feature that needs to remember something about a
    grafted model adds a field here (with its default), not an attribute elsewhere.
    """

    input_names: list[str]  # the graph's tensor inputs, in call order
    max_positions: int  # the longest sequence the position embeddings allow
    position_ids: str | None  # how the HF forward fills position_ids when none are given (graftr.trace)
    hf_config: Any  # transformers.PretrainedConfig of the traced model (shared with it)
    hf_class: str  # the traced HF class, e.g. "LlamaForCausalLM"
    task: str  # graftr.names.TASKS
    model_id: str | None  # the base model's id or directory
    site_index: Any  # graftr.sites.SiteIndex of the flat graph
    adapters: dict[str, NamedAdapter] = field(default_factory=dict)  # name -> adapter, in the order they were added
    active: list[str] = field(default_factory=list)  # the adapters that compute (graftr.named)
    disabled: bool = False  # inside disable_adapter(): every adapter off
    quantize: Any = None  # the quantize: section the base was quantized with (graftr.sections.QuantizeConfig)
    outlined: list[str] = field(default_factory=list)  # layers the outline_layers pass made submodules of
    embeddings: dict[str, str] = field(default_factory=dict)  # "input"/"output" -> module path (graftr.calling)
    generation_config: Any = None  # transformers.GenerationConfig, made from hf_config when first read (graftr.hf)
    quantized: dict = field(default_factory=dict)  # site path -> graftr.quantize.QuantizedWeight (the quantize pass)
    experts_implementation: str | None = None  # a MoE model's experts_implementation before graftr pinned its own


@dataclass
class _Runtime:
    """Caches of a grafted model's calls (not part of what grafting produced): dropped when the graph changes."""

    fused_head: Any = None  # (graph up to the head, head weight, head bias), False if none, None: not built yet
    compile_options: dict | None = None  # torch.compile options of compile_graph
    backbone: Any = None  # the graph up to the LM head's input (model.base_model), None: not built yet


def _recorded(name: str, doc: str) -> property:
    def get(self):
        return getattr(self.grafting, name)

    def set_(self, value):
        setattr(self.grafting, name, value)

    return property(get, set_, doc=doc)


class GraftedModel(fx.GraphModule):
    """A traced HF model (optionally with adapters). Build it with :func:`graftr.graft` or :func:`prepare`.

    What grafting produced is one declared record, :class:`Grafting` (``gm.grafting``); the attributes below read
    and set its fields. :class:`graftr.hf.GraftedModel`, what :func:`graftr.graft` returns, adds the
    ``transformers.PreTrainedModel`` interface of the class it was traced from."""

    fused_loss = True  # training-mode LM loss from the head's input, without logits (see the module docstring)
    supports_gradient_checkpointing = True
    grafting: Grafting

    graftr_input_names = _recorded("input_names", "the graph's tensor inputs, in call order")
    graftr_max_positions = _recorded("max_positions", "the longest sequence the position embeddings allow")
    graftr_position_ids = _recorded("position_ids", "how the HF forward fills position_ids when none are given")
    graftr_outlined = _recorded("outlined", "layers the outline_layers pass made submodules of")
    hf_config = _recorded("hf_config", "the traced model's transformers config (shared with it)")
    hf_class = _recorded("hf_class", "the traced HF class name")
    task = _recorded("task", "the task the model was traced for (graftr.names.TASKS)")
    model_id = _recorded("model_id", "the base model's id or directory")
    graftr_embeddings = _recorded("embeddings", "module paths of the input and output embeddings")
    graftr_quantized = _recorded("quantized", "what the quantize pass did, per linear site path")

    @property
    def site_index(self):
        """The sites of the flat graph (:func:`graftr.sites.find_sites`); refused once the layers are outlined, since
        the site nodes then no longer are the graph's."""
        if self.grafting.outlined:
            raise RuntimeError(f"{type(self).__name__}: the layers are outlined; its site index describes the flat "
                               "graph (outline last, after matching, rewriting and merging)")
        return self.grafting.site_index

    @site_index.setter
    def site_index(self, value) -> None:
        self.grafting.site_index = value

    @property
    def recipe(self):
        """The recipe of the model's first adapter (``"default"``, the one :func:`graft` inserted), or None."""
        first = next(iter(self.grafting.adapters.values()), None)
        return first.recipe if first is not None else None

    @property
    def recipes(self) -> dict[str, Any]:
        """Every adapter's recipe by name, in the order they were added (PEFT's ``peft_config``)."""
        return {name: a.recipe for name, a in self.grafting.adapters.items()}

    @property
    def plans(self) -> list:
        """What the rewrite pass inserted, per rule (:class:`graftr.passes.RulePlan`), for every adapter in turn."""
        return [plan for a in self.grafting.adapters.values() for plan in a.plans]

    def adopt_interface(self, model: nn.Module) -> None:
        """Take from ``model``, the HF module this graph was traced from, what calling it needs: its forward
        signature and the paths of its embeddings (:func:`graftr.calling.adopt_signature`). Run once, by
        :func:`prepare`; :class:`graftr.hf.GraftedModel` adds what HF tools read."""
        adopt_signature(self, model)

    @property
    def _runtime(self) -> _Runtime:
        runtime = self.__dict__.get("_graftr_runtime")
        if runtime is None:  # also while GraphModule.__init__ compiles the graph the first time
            runtime = self.__dict__["_graftr_runtime"] = _Runtime()
        return runtime

    def recompile(self):
        result = super().recompile()
        cls = type(self)
        cls._graph_forward = cls.forward  # the generated code
        cls.forward = hf_forward(cls)
        self._runtime.fused_head = None  # the graph changed: rebuild the fused-loss variant when next needed
        self._runtime.backbone = None
        return result

    def compile_graph(self, **options: Any) -> None:
        """``torch.compile`` the generated graph code (and its fused-loss variant), not the keyword wrapper."""
        self._graph_forward = torch.compile(type(self)._graph_forward.__get__(self), **options)
        self._runtime.compile_options = options
        self._runtime.fused_head = None
        self._runtime.backbone = None

    # ---- calling like the HF model -------------------------------------------------------------------------
    def _hf_forward(self, *args: Any, **kwargs: Any):
        inputs, loss_args = bind_forward(self, args, kwargs)  # positional input_ids, the HF class's keywords
        labels, count, keep = (loss_args.get(k) for k in ("labels", "num_items_in_batch", "logits_to_keep"))
        inputs = self.complete_inputs(inputs, labels)
        if labels is not None and self.training and self.fused_loss and self.task in _LM_LOSS_SHIFT and keep in (None, 0):
            head = self._fused_head()
            if head is not None:
                body, weight, bias = head
                weight, bias = self.get_parameter(weight), (self.get_parameter(bias) if bias else None)
                if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
                    out = body(**inputs)  # the graph up to the head: "logits" holds the head's input
                    # the chunk buffer kept between steps (graftr.loss.Scratch); an instance attribute of its own,
                    # "_graftr_scratch", which outlives graph changes
                    scratch = self.__dict__.setdefault("_graftr_scratch", Scratch())
                    shift = _LM_LOSS_SHIFT[self.task]
                    loss = linear_cross_entropy(out.logits, weight, bias, labels, shift=shift, scratch=scratch)
                    if count is not None:  # a sum over the tokens of the whole (accumulated) batch, as HF's losses
                        loss = loss * _scored(labels, shift) / count
                    return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "logits"})
        out = self._graph_forward(**inputs)
        if keep not in (None, 0):
            out["logits"] = keep_logits(out.logits, keep)
        if labels is None:
            return out
        return type(out)(loss=self._loss(out, labels, count), **out)

    def logits_at(self, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The logits at the positions ``mask`` ((B, T) bool) selects, as an (N, V) float32 tensor (N selected).

        A language model whose logits are one linear head runs its graph up to the head's input and applies the head
        at those positions only: the head is most of a small LM's forward (SmolLM2: 49,152 × 576 per token, a
        fifth of its parameters), and an evaluation scores a few answer tokens of each row. Otherwise the full
        logits are computed and sliced. Takes the HF forward's keyword arguments (no labels)."""
        inputs, _ = bind_forward(self, (), kwargs)
        inputs = self.complete_inputs(inputs, None)
        head = self._fused_head() if self.task in _LM_LOSS_SHIFT else None
        if head is None:
            return self._graph_forward(**inputs).logits[mask].float()
        body, weight, bias = head
        hidden = body(**inputs).logits[mask]
        weight, bias = self.get_parameter(weight), (self.get_parameter(bias) if bias else None)
        return nn.functional.linear(hidden, weight.to(hidden.dtype),
                                    None if bias is None else bias.to(hidden.dtype)).float()

    def complete_inputs(self, kwargs: dict[str, Any], labels: torch.Tensor | None) -> dict[str, Any]:
        """Every graph input, from the given ones: masks of ones, HF's default positions, shifted labels."""
        names = self.graftr_input_names
        if kwargs.get("input_ids") is None:
            raise TypeError("input_ids is required")
        ids = kwargs["input_ids"]
        if "decoder_input_ids" in names and kwargs.get("decoder_input_ids") is None:
            if labels is None:
                raise TypeError("an encoder-decoder model needs decoder_input_ids or labels")
            kwargs["decoder_input_ids"] = self._shift_right(labels)
        if "pixel_values" in names and kwargs.get("pixel_values") is None:
            raise TypeError("pixel_values is required: this model's prompts are conditioned on images "
                            "(the recipe's vision: section)")
        for name in names:
            if kwargs.get(name) is None and name != "position_ids":
                like = kwargs["decoder_input_ids"] if name.startswith("decoder_") else ids
                kwargs[name] = (torch.zeros_like(like) if name == "token_type_ids" else torch.ones_like(like))
        if "position_ids" in names and kwargs.get("position_ids") is None:  # what the HF forward would use
            kwargs["position_ids"] = tracing.default_position_ids(self.graftr_position_ids, kwargs["attention_mask"])
        return {n: kwargs[n] for n in names}

    def loss_workspace_bytes(self, tokens: int) -> int:
        """Bytes the training loss of ``tokens`` tokens allocates besides what autograd saves: the fused loss's
        logits chunk (:func:`graftr.loss.workspace_bytes`); 0 when the loss is not fused (the logits are then saved
        for backward, and counted as such)."""
        from graftr.loss import workspace_bytes

        if not (self.fused_loss and self.task in _LM_LOSS_SHIFT):
            return 0
        head = self._fused_head()
        weight = self.get_parameter(head[1]) if head is not None else None
        if weight is None or weight.requires_grad:
            return 0
        return workspace_bytes(tokens, weight.shape[0], weight.dtype)

    def _fused_head(self) -> tuple[Any, str, str | None] | None:
        """(the graph up to the logits' linear head, as a function of the inputs; head weight; head bias), or None
        if the logits are not one linear of the head's input (Gemma-2's soft-capping, an adapter on the head)."""
        runtime = self._runtime
        if runtime.fused_head is None:
            runtime.fused_head = self._build_fused_head() or False
        return runtime.fused_head or None

    @torch._dynamo.disable
    def _build_fused_head(self) -> tuple[Any, str, str | None] | None:
        codegen = self.graph._codegen
        spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
        keys = list(getattr(spec, "context", None) or [])
        if "logits" not in keys or spec.num_leaves != len(keys):
            return None
        node = self.graph.output_node().args[0][keys.index("logits")]
        if not (node.op == "call_function" and node.target is torch.ops.aten.linear.default and len(node.users) == 1
                and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:])):
            return None
        body = self._body_returning(node.args[0])
        return body, node.args[1].target, (node.args[2].target if len(node.args) > 2 else None)

    def _body_returning(self, value: fx.Node):
        """The graph with ``value`` in place of the logits in its output, the nodes only the logits need removed:
        a function of the graph's inputs (compiled as the graph is). None if the output has no logits leaf."""
        codegen = self.graph._codegen
        spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
        keys = list(getattr(spec, "context", None) or [])
        if "logits" not in keys or spec.num_leaves != len(keys):
            return None
        leaves, at = self.graph.output_node().args[0], keys.index("logits")
        graph, env = fx.Graph(owning_module=self), {}
        graph.graph_copy(self.graph, env)
        copied = [env[n] if isinstance(n, fx.Node) else n for n in leaves]
        copied[at] = env[value]
        graph.output(type(leaves)(copied))
        graph.eliminate_dead_code()
        graph._codegen = codegen
        code = graph.python_code(root_module="self")
        body = fx.graph_module._forward_from_src(code.src, code.globals).__get__(self)
        options = self._runtime.compile_options
        if options is not None:
            body = torch.compile(body, **options)
        return body

    @torch._dynamo.disable
    def backbone_graph(self):
        """The graph up to the LM head's input, as a function of the graph's inputs returning that (B, T, D) tensor
        (``model.base_model``); refused when adapters sit on the head, whose input a caller's own head would skip."""
        runtime = self._runtime
        if runtime.backbone is not None:
            return runtime.backbone
        path = self.graftr_embeddings.get("output")
        site = next((s for s in self.grafting.site_index.linear if s.path == path), None) if path else None
        if site is None:
            raise GraftrError(f"{self.hf_class} has no linear LM head graftr found; base_model is not available")
        if site.adapters:
            raise GraftrError(f"adapters on {site.path} (the LM head) would be skipped by code applying the head to "
                              "base_model's output (TRL's fused LM head); graft the head's input or leave it alone")
        body = self._body_returning(self._head_input(site))
        if body is None:
            raise GraftrError(f"the graph of {self.hf_class} returns no logits; base_model is not available")
        runtime.backbone = lambda **inputs: body(**inputs).logits
        return runtime.backbone

    def _head_input(self, site) -> fx.Node:
        """The node the LM head ``site`` reads in the current graph: the site's input in the flat graph; once the
        layers are outlined (activation checkpointing), the input of the root graph's linear reading its weight."""
        if not self.grafting.outlined:
            return site.input
        for node in self.graph.nodes:
            weight = node.args[1] if node.op == "call_function" and node.target is torch.ops.aten.linear.default \
                else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == site.weight:
                return node.args[0]
        raise GraftrError(f"the LM head {site.path} is not a linear of the outlined graph; base_model is not available")

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.hf_config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, cfg.pad_token_id)

    def _loss(self, out, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        from transformers.loss.loss_utils import (ForCausalLMLoss, ForMaskedLMLoss, ForSequenceClassificationLoss,
                                                  ForTokenClassification)

        logits, cfg, task = out.logits, self.hf_config, self.task
        vocab = logits.shape[-1]
        if task == "causal_lm":
            return ForCausalLMLoss(logits, labels, vocab_size=vocab, num_items_in_batch=num_items_in_batch)
        if task == "masked_lm":
            return ForMaskedLMLoss(logits, labels, vocab_size=vocab, num_items_in_batch=num_items_in_batch)
        if task == "seq2seq_lm":
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1).to(logits.device),
                                               ignore_index=IGNORE_INDEX, reduction="sum" if num_items_in_batch else "mean")
            return loss / num_items_in_batch if num_items_in_batch else loss
        if task == "seq_cls":
            return ForSequenceClassificationLoss(labels, logits, cfg)
        if task == "token_cls":
            return ForTokenClassification(logits, labels, cfg)
        raise GraftrError(f"no loss is defined for task {task!r}")

    # ---- parameters ----------------------------------------------------------------------------------------
    def adapter_modules(self) -> dict[str, nn.Module]:
        return {t: self.get_submodule(t) for plan in self.plans for t in plan.modules}

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The trainable tensors (adapter parameters and the recipe's trainable modules), or with ``adapter_name``
        every tensor of that adapter, trainable or not; under the model's parameter names."""
        if adapter_name is not None:
            return {n: self.get_parameter(n) for n in named.named(self, adapter_name).params}
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; a weight stored quantized counts as the dense weight it replaced."""
        from graftr.quantize import stored_numel

        params = list(self.parameters())
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params) + stored_numel(self))

    # ---- named adapters (PEFT's interface, graftr.named) -------------------------------------------------------
    def add_adapter(self, adapter_name: str, recipe) -> "GraftedModel":
        """Graft ``recipe`` as a new adapter named ``adapter_name``, at its init (identity), inactive and frozen
        until :meth:`set_adapter` (PEFT's ``add_adapter``). See :mod:`graftr.named` for what may coexist."""
        return graft(self, recipe, adapter_name=adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (one name or several, which then apply together in the order they were added) the
        active adapters; their tensors become trainable unless ``inference_mode``, the others' frozen."""
        named.set_active(self, [adapter_name] if isinstance(adapter_name, str) else list(adapter_name),
                         inference_mode=inference_mode)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        return list(self.grafting.active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names if several (or none) are active, as PEFT's."""
        active = self.grafting.active
        return active[0] if len(active) == 1 else list(active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter: its nodes, modules and parameters (PEFT's ``delete_adapter``; if it was the only
        active one, the first remaining adapter becomes active)."""
        named.delete(self, adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` every adapter is off inside the block, so the model computes its base
        model's outputs exactly (no copy of the base); refused for adapters that changed the base in place."""
        with named.disabled(self):
            yield

    # ---- activation checkpointing (transformers' PreTrainedModel interface) -------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations (see
        :mod:`graftr.checkpointing`); outlines the layers if they are not yet. ``gradient_checkpointing_kwargs``
        are passed to ``torch.utils.checkpoint.checkpoint`` (``preserve_rng_state``, ``determinism_check``,
        ``debug``; graftr always uses ``use_reentrant=False``)."""
        from graftr import checkpointing

        checkpointing.enable(self, gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Keep every layer's activations for backward again."""
        from graftr import checkpointing

        checkpointing.disable(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        from graftr import checkpointing

        return checkpointing.enabled(self)

    # ---- merging -------------------------------------------------------------------------------------------
    def merge_(self) -> "GraftedModel":
        """Fold the active adapters into their sites' base weights and remove every adapter from the graph (in
        place; PEFT's ``merge_and_unload``: with one adapter, that one).

        Checks every site first and raises :class:`MergeError` before changing anything if one cannot be merged.
        """
        run_passes(self, MergeAdapters())
        return self


class MergeAdapters(GraphPass):
    """Fold the active adapters of a grafted model into their sites' base weights and remove every adapter from the
    graph; afterwards the model is its plain base model again (with the merged weights). ``requires`` checks every
    site before anything changes."""

    name = "merge_adapters"

    @staticmethod
    def merged(gm: GraftedModel) -> set[str]:
        """The adapter modules whose effect is folded into the weights: the active adapters' (none if disabled)."""
        if gm.grafting.disabled:
            return set()
        return {t for name in gm.grafting.active for t in gm.grafting.adapters[name].targets}

    def requires(self, gm: GraftedModel) -> None:
        if getattr(gm, "graftr_outlined", None):
            raise MergeError("merge_ works on the flat graph, and this model's layers are outlined"
                             + (" (call gradient_checkpointing_disable() first)" if gm.is_gradient_checkpointing
                                else ""))
        merged = self.merged(gm)
        for site in gm.site_index.all():
            adapters = [gm.get_submodule(t) for t in site.adapters if t in merged]
            dropped = [reason for t in site.adapters if t not in merged
                       if (reason := gm.get_submodule(t).detach_refusal()) is not None]
            if dropped:
                raise MergeError(f"{site.path}: an inactive adapter is not merged and must leave the graph, but "
                                 f"{dropped[0]}")
            if not adapters:
                continue
            if site.op == "linear" and site.quant:
                raise MergeError(f"{site.path}: its weight is stored quantized ({site.quant}); merge into the "
                                 "dequantized weights with graftr merge (or graft with round_trip=True)")
            if site.op == "attention":
                raise MergeError(f"{site.path}: {ATTENTION_NOT_MERGEABLE}")
            adapters[0].check_site_merge(site.path, adapters)  # the linear kinds' rule (graftr.adapters.base)

    def call(self, gm: GraftedModel) -> PassResult:
        merged = self.merged(gm)
        with torch.no_grad():
            for site in gm.site_index.all():
                targets = [t for t in site.adapters if t in merged]
                if not targets:
                    continue
                weight = gm.get_parameter(site.weight)
                bias = gm.get_parameter(site.bias) if site.bias else None
                w, b = weight.data, (bias.data if bias is not None else None)
                scalings = []  # the input scalings merged so far: a branch after them reads the scaled input
                for target in targets:
                    module = gm.get_submodule(target)
                    if module.position == "output" and not module.is_scaling and scalings:
                        delta, _ = module.merge_into(torch.zeros_like(w, dtype=torch.float32), None, site.layout)
                        for scaling in scalings:  # Δ diag(l): the branch's weight on the unscaled input
                            delta, _ = scaling.merge_into(delta, None, site.layout)
                        w = (w.float() + delta).to(w.dtype)
                        continue
                    w, b = module.merge_into(w, b, site.layout)
                    if module.position == "input":
                        scalings.append(module)
                weight.data.copy_(w)
                if bias is not None:
                    bias.data.copy_(b)
                elif b is not None:  # an adapter added a bias (scale_bias) where the base has none
                    self._add_bias(gm, site, b)
        for record in list(gm.grafting.adapters.values()):  # every adapter leaves the graph, folded in or not
            named.remove(gm, record)
        gm.grafting.active, gm.grafting.disabled = [], False
        return PassResult(gm, True)

    @staticmethod
    def _add_bias(gm: GraftedModel, site, bias: torch.Tensor) -> None:
        """Give the bias-free linear ``site`` the bias ``bias``: a parameter at ``<site path>.bias``, read by its op."""
        node = next(n for n in site.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
        owner = gm.get_submodule(site.path)
        if hasattr(owner, "bias") and getattr(owner, "bias") is not None:
            raise MergeError(f"{site.path} already has a bias attribute the graph does not read")
        owner.register_parameter("bias", nn.Parameter(bias.detach().clone(), requires_grad=False))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"{site.path}.bias")
        node.args = (*node.args[:2], attr)
        site.bias = f"{site.path}.bias"


def _scored(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """How many labels a language-model loss scores (a causal LM's first label predicts nothing)."""
    return (labels[..., 1:] if shift else labels).ne(IGNORE_INDEX).sum()


def prepare(model: nn.Module, *, model_id: str | None = None, task: str | None = None, dynamic: bool = True,
            cls: type[GraftedModel] | None = None) -> GraftedModel:
    """Trace ``model`` into a :class:`GraftedModel` (or ``cls``, a subclass: :class:`graftr.hf.GraftedModel` for
    the HF interface) with no adapters (parameters shared, not copied).

    ``dynamic=False`` is for plans that never run (see :func:`graftr.trace.export`): the graph takes only the
    tracing example's shapes."""
    from graftr.moe import pin_experts_implementation

    experts_before = pin_experts_implementation(model)
    spec = tracing.trace_spec(model)
    gm = tracing.to_graph_module(tracing.export(model, spec, dynamic=dynamic), cls=cls or GraftedModel,
                                 class_name=f"Grafted{type(model).__name__}")
    if task is None:
        from graftr.models import infer_task

        task = infer_task(model.config)
    gm.grafting = Grafting(input_names=list(spec.input_names), max_positions=spec.max_positions,
                           position_ids=spec.position_ids, hf_config=model.config, hf_class=type(model).__name__,
                           task=task, model_id=model_id or getattr(model.config, "_name_or_path", "") or None,
                           site_index=find_sites(gm), experts_implementation=experts_before)
    gm.adopt_interface(model)
    return gm


def graft(model: nn.Module | GraftedModel, recipe, *, model_id: str | None = None, round_trip: bool = False,
          adapter_name: str = DEFAULT, cls: type[GraftedModel] | None = None) -> GraftedModel:
    """Trace (if needed, as ``cls``: see :func:`prepare`), quantize the frozen base (the recipe's ``quantize:``),
    match the recipe's rules, insert their adapters as the adapter ``adapter_name``, make it the active adapter and
    freeze everything else.

    On a model that holds adapters already, the recipe becomes one more, inactive and frozen until
    ``set_adapter`` (:meth:`GraftedModel.add_adapter`, :mod:`graftr.named`).

    ``round_trip=True`` keeps the base dense but replaces each weight the recipe quantizes by
    ``dequantize(quantize(W))``, the weights a quantized model computes with (``graftr merge`` folds adapters into
    them)."""
    gm = model if isinstance(model, GraftedModel) else prepare(model, model_id=model_id, task=recipe.task, cls=cls)
    first = not gm.grafting.adapters
    owned = set(_insert(gm, recipe, adapter_name, round_trip=round_trip).params)
    if first:
        for name, p in gm.named_parameters():
            p.requires_grad_(name in owned)
        gm.grafting.active = [adapter_name]
    else:
        for name in owned:
            gm.get_parameter(name).requires_grad_(False)
    named.apply_activity(gm)
    return gm


def _insert(gm: GraftedModel, recipe, name: str, *, round_trip: bool) -> NamedAdapter:
    """Run the passes that graft ``recipe`` as the adapter ``name`` and record it (``gm.grafting.adapters``)."""
    from graftr.quantize import QuantizePass, active
    from graftr.selectors import compile_glob

    named.check_addition(gm, recipe, name)
    vision_input = []
    if recipe.vision is not None:  # the image input and I_p, read by the rules with condition: image
        from graftr import vision

        vision_input = [vision.VisionPass(recipe.vision)]
    inserted = passes.RewritePass(recipe, adapter=name)
    quantize = getattr(recipe, "quantize", None)
    first = [QuantizePass(quantize, trainable=recipe.trainable_modules, round_trip=round_trip)] \
        if active(quantize) and gm.grafting.quantize is None else []
    run_passes(gm, *first, passes.MatchPass(recipe), *vision_input, inserted)
    if first:
        gm.grafting.quantize = quantize
    plans = inserted.plans
    if recipe.vision is not None:
        recipe = vision.with_absolute_encoder(recipe)
    adapter_prefixes = tuple(t + "." for p in plans for t in p.modules)
    if recipe.vision is not None:
        adapter_prefixes += (f"{vision.TARGET}.projection.",)
    globs = [compile_glob(g) for g in recipe.trainable_modules]
    module_paths = [n for n, _ in gm.named_modules() if n]
    unmatched = [g for g, rx in zip(recipe.trainable_modules, globs) if not any(rx.fullmatch(m) for m in module_paths)]
    if unmatched:
        raise GraftrError(f"trainable_modules {unmatched} match no module of {gm.hf_class}")

    def owned(param: str) -> bool:
        owner = param.rsplit(".", 1)[0]
        return param.startswith(adapter_prefixes) or any(
            rx.fullmatch(owner) or any(rx.fullmatch(owner.rsplit(".", k)[0]) for k in range(1, owner.count(".") + 1))
            for rx in globs)

    record = NamedAdapter(name, recipe, plans, [n for n, _ in gm.named_parameters() if owned(n)])
    gm.grafting.adapters[name] = record
    return record


def summary(gm: GraftedModel) -> dict[str, Any]:
    trainable, total = gm.trainable_counts()
    several = len(gm.grafting.adapters) > 1  # rule names are then given with their adapter's (rule@adapter)
    rules = [{"rule": named.qualified(p.name, a.name) if several else p.name, "kind": p.rule.adapter.kind,
              "sites": len(p.sites), "params": p.params_added, "examples": [s.path for s in p.sites[:3]]}
             for a in gm.grafting.adapters.values() for p in a.plans]
    if getattr(gm.recipe, "vision", None) is not None:  # the image projection shared by the conditioned prompts
        from graftr.vision import TARGET

        projection = gm.get_submodule(f"{TARGET}.projection")
        rules.append({"rule": "vision", "kind": "image projection", "sites": 1,
                      "params": sum(p.numel() for p in projection.parameters()),
                      "examples": [f"{TARGET}.projection ({gm.recipe.vision.encoder}, frozen)"]})
    return {
        "rules": rules,
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / total if total else math.nan,
    }
