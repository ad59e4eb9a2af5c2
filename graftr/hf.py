"""The grafted model as a Hugging Face ``PreTrainedModel``: what Trainer, TRL and lm-evaluation-harness read.

:class:`GraftedModel` here is the core :class:`graftr.grafted.GraftedModel` (the graph, called like the HF model)
with :class:`HFModelMixin` (``transformers.PreTrainedModel`` and ``GenerationMixin``) above it: this module builds
on the core and on the adapter formats, loaders and generation it calls, and none of them imports it.
:func:`prepare`, :func:`graft` and :func:`load_adapter` (``graftr.prepare``, ``graftr.graft``,
``graftr.load_adapter``) make this class; the same functions of the core make the plain graph. Nothing in it is
written per family: :meth:`GraftedModel.adopt_interface` copies what the tools read from the traced model's own class
and config when the graph is built —

* the class attributes HF code looks up on the model (``base_model_prefix``, ``main_input_name``,
  ``_no_split_modules``, ``_keys_to_ignore_on_save``, ...) and ``loss_type``, found from the class name exactly as
  ``PreTrainedModel.__init__`` finds it (``Trainer`` counts ``num_items_in_batch`` over shifted labels for
  ``ForCausalLM``);
* through the core, the forward signature (:mod:`graftr.calling`) and the paths of the input and output embeddings
  (``get_input_embeddings``/``get_output_embeddings`` return an ``nn.Embedding``/``nn.Linear`` sharing the graph's
  parameters; the graph calls the ops, not these modules, so hooks on them do not fire).

``config``, ``name_or_path``, ``generation_config``, ``device``, ``dtype`` behave as on the HF model;
``accepts_loss_kwargs`` is true for language models, whose losses divide by ``num_items_in_batch`` as transformers'
do. ``base_model`` is the graph up to the LM head's input, returning ``last_hidden_state`` (TRL's fused LM head calls
it). ``save_pretrained`` writes each adapter as a graftr adapter directory, ``load_adapter(path, adapter_name)`` adds
one (named adapters, :mod:`graftr.named`), ``GraftedModel.from_pretrained`` reads one back. ``generate`` follows
``GenerationMixin.generate`` for greedy and sampled decoding — its own generation config merging, logits processors
and stopping criteria — on graftr's KV-cache graph (:mod:`graftr.generate`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

from graftr import grafted, named
from graftr.calling import bind_forward
from graftr.errors import GraftrError

LM_TASKS = ("causal_lm", "masked_lm", "seq2seq_lm")  # tasks whose loss honours num_items_in_batch
GENERATIVE_TASKS = ("causal_lm", "seq2seq_lm")

# Class attributes of the HF model class that HF tools read on a model instance, copied by `adopt_interface`.
_CLASS_ATTRIBUTES = ("base_model_prefix", "main_input_name", "config_class", "_no_split_modules",
                     "_keys_to_ignore_on_save", "_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected",
                     "_tied_weights_keys", "_skip_keys_device_placement", "input_modalities")


def prepare(model: nn.Module, **kwargs) -> GraftedModel:
    """:func:`graftr.grafted.prepare` into a :class:`GraftedModel` (a ``PreTrainedModel``)."""
    return grafted.prepare(model, cls=GraftedModel, **kwargs)


def graft(model: nn.Module, recipe, **kwargs) -> GraftedModel:
    """:func:`graftr.grafted.graft`, tracing ``model`` (if it is not grafted yet) into a :class:`GraftedModel`."""
    return grafted.graft(model, recipe, cls=GraftedModel, **kwargs)


def load_adapter(model: nn.Module, path, **kwargs) -> GraftedModel:
    """:func:`graftr.formats.load_adapter`, tracing ``model`` (if it is not grafted yet) into a
    :class:`GraftedModel`."""
    from graftr.formats import load_adapter as load

    return load(model, path, cls=GraftedModel, **kwargs)


def _loss_type(class_name: str) -> str | None:
    """``PreTrainedModel.__init__``'s rule: the LOSS_MAPPING key the class name is, or contains."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if class_name in LOSS_MAPPING:
        return class_name
    found = re.findall(f"({'|'.join(LOSS_MAPPING)})", class_name)
    return found[0] if found else None


class _View(nn.Module):
    """A module sharing parameters of the graph without being registered in it (so no parameter counts twice)."""

    def __init__(self, gm):
        super().__init__()
        object.__setattr__(self, "_gm", gm)  # not a submodule: the graph stays the one owner of its parameters


class Backbone(_View):
    """The grafted model up to the LM head's input: ``forward`` returns ``BaseModelOutput(last_hidden_state=h)``.

    This is what ``model.base_model`` is for HF code that applies the head itself (TRL's fused LM head)."""

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        gm = self._gm
        body = gm.backbone_graph()
        inputs, loss = bind_forward(gm, args, kwargs)
        if loss.get("labels") is not None:
            raise TypeError("base_model takes no labels (it returns the LM head's input)")
        return BaseModelOutput(last_hidden_state=body(**gm.complete_inputs(inputs, None)))


def _linear_view(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    view = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    view.weight = weight
    if bias is not None:
        view.bias = bias
    return view


def _embedding_view(weight: nn.Parameter, padding_idx: int | None) -> nn.Embedding:
    view = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
    view.weight = weight
    view.padding_idx = padding_idx if padding_idx is not None and 0 <= padding_idx < weight.shape[0] else None
    return view


class HFModelMixin(PreTrainedModel, GenerationMixin):
    """The ``PreTrainedModel`` interface of a grafted model (see the module docstring), above the core in
    :class:`GraftedModel`'s bases (so ``GraphModule.__init__``'s ``super().__init__()`` lands here)."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, *args, **kwargs):
        # GraphModule.__init__ builds the module; PreTrainedModel.__init__ (config checks, weight init) does not apply
        nn.Module.__init__(self)

    # ---- what the tools read --------------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf_config

    @config.setter
    def config(self, value) -> None:
        self.hf_config = value

    @property
    def name_or_path(self) -> str:
        return self.model_id or getattr(self.hf_config, "_name_or_path", "") or ""

    @name_or_path.setter
    def name_or_path(self, value: str) -> None:
        self.model_id = value

    @property
    def generation_config(self) -> GenerationConfig | None:
        """The model's generation config, made from its config on first use (as ``PreTrainedModel.__init__`` does
        for a model that can generate); None for a model that does not generate."""
        grafting = self.grafting
        if grafting.generation_config is None and self.task in GENERATIVE_TASKS:
            try:
                grafting.generation_config = GenerationConfig.from_model_config(self.hf_config)
            except NotImplementedError:
                grafting.generation_config = GenerationConfig()
        return grafting.generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | None) -> None:
        self.grafting.generation_config = value

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the loss divides by ``num_items_in_batch`` when given (transformers' LM losses do), so Trainer
        leaves gradient accumulation's scaling to it."""
        return self.task in LM_TASKS

    @property
    def base_model(self) -> Backbone:
        return Backbone(self)

    def get_base_model(self):
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        path = self._embedding_path("input")
        module = self.get_submodule(path)
        return _embedding_view(module.weight, getattr(self.hf_config, "pad_token_id", None))

    def get_output_embeddings(self) -> nn.Linear | None:
        path = self.graftr_embeddings.get("output")
        if path is None:
            return None
        module = self.get_submodule(path)
        return _linear_view(module.weight, getattr(module, "bias", None))

    def _embedding_path(self, which: str) -> str:
        path = self.graftr_embeddings.get(which)
        if path is None:
            raise GraftrError(f"{self.hf_class} has no {which} embeddings graftr knows of")
        return path

    def set_input_embeddings(self, value) -> None:
        raise GraftrError("the embeddings of a grafted model are part of its graph and cannot be replaced; "
                          "resize or replace them on the HF model before grafting")

    def set_output_embeddings(self, value) -> None:
        self.set_input_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs):
        self.set_input_embeddings(None)

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to do: tied parameters were traced as one parameter and stay one."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name, which ``Trainer`` calls: graftr's checkpointing of every decoder layer
        (``GraftedModel.gradient_checkpointing_enable``, :mod:`graftr.checkpointing`)."""
        if every_n_layers != 1 or offload:
            raise GraftrError("a grafted model checkpoints every layer, without offloading "
                              "(activation_checkpointing_kwargs every_n_layers/offload are not supported)")
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        """Nothing to do: gradients reach the adapters through the graph whatever the embeddings require."""

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, as PEFT's ``PeftModel.print_trainable_parameters``."""
        trainable, total = self.trainable_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
              f"{100 * trainable / total if total else 0:.4f}")

    # ---- saving and loading -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, **kwargs) -> None:
        """Write each adapter (or those in ``selected_adapters``) as a graftr adapter directory (tensors, resolved
        recipe, manifest): ``"default"`` into ``save_directory``, any other into ``save_directory/<name>``, as PEFT
        does; each is an ordinary adapter directory, loadable alone.

        ``state_dict`` (as ``Trainer`` passes one gathered from DeepSpeed or FSDP) supplies the adapter tensors by
        name. The files are written into the directory, each complete or not at all; other files in it (a
        tokenizer, Trainer's state) stay. HF's serialization options (``safe_serialization``, ``max_shard_size``,
        ``push_to_hub``...) do not apply to an adapter and are refused when set to something else than the
        default."""
        if kwargs.pop("push_to_hub", False):
            raise GraftrError("push_to_hub is not supported for a graftr adapter; push the directory yourself")
        for key in ("safe_serialization", "max_shard_size", "variant", "save_function", "token", "save_peft_format"):
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments {sorted(kwargs)}")
        if not is_main_process:
            return
        if not self.grafting.adapters:
            raise GraftrError("this model has no adapters to save; save the HF model it was traced from instead")
        names = list(self.grafting.adapters) if selected_adapters is None else list(selected_adapters)
        for name in names:
            named.named(self, name)
        out = Path(save_directory)
        for name in names:
            tensors = None
            if state_dict is not None:
                params = self.adapter_state_dict(name)
                missing = sorted(n for n in params if n not in state_dict)
                if missing:
                    raise GraftrError(f"the state_dict to save lacks adapter tensors: {', '.join(missing[:3])}")
                tensors = {n: state_dict[n] for n in params}
            self._write_adapter(out if name == named.DEFAULT else out / name, name, tensors)

    def _write_adapter(self, out: Path, name: str, tensors: dict | None) -> None:
        """Adapter ``name``'s files into ``out`` (made if needed), each renamed into place, the manifest last."""
        from graftr.formats.graftr import MANIFEST, RECIPE, TENSORS, save_adapter

        if out.exists() and not out.is_dir():
            raise GraftrError(f"{out} exists and is not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.adapter-{os.getpid()}"
        save_adapter(self, staging, adapter=name, tensors=tensors)
        try:
            out.mkdir(exist_ok=True)
            for file in (TENSORS, RECIPE, MANIFEST):  # the manifest last: it marks a complete adapter
                os.replace(staging / file, out / file)
        finally:
            for left in staging.glob("*"):
                left.unlink()
            staging.rmdir()

    def load_adapter(self, model_id, adapter_name: str = named.DEFAULT, is_trainable: bool = False, *,
                     trust_code: bool = False, **kwargs) -> None:
        """Add the adapter in ``model_id`` (a graftr or PEFT adapter directory) as ``adapter_name`` (PEFT's
        ``load_adapter``): inactive until :meth:`set_adapter` unless it is the model's first, frozen unless
        ``is_trainable``; the model is put in eval mode if not. ``trust_code``: see :func:`graftr.load_adapter`."""
        if kwargs:
            raise TypeError(f"load_adapter() got unexpected keyword arguments {sorted(kwargs)}")
        load_adapter(self, model_id, adapter_name=adapter_name, trust_code=trust_code)
        for param in self.adapter_state_dict(adapter_name).values():
            param.requires_grad_(is_trainable)
        if not is_trainable:
            self.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, model: nn.Module | None = None,
                        dtype: torch.dtype | None = None, trust_code: bool = False, **kwargs):
        """Load a graftr adapter directory (or a PEFT adapter directory): onto ``model`` (an HF model) when given,
        else onto the base the adapter records, loaded with its weights. Returns the grafted model in eval mode.
        ``trust_code``: see :func:`graftr.load_adapter`."""
        if kwargs:
            raise TypeError(f"GraftedModel.from_pretrained() got unexpected keyword arguments {sorted(kwargs)}")
        from graftr.load import load_for_inference

        path = str(pretrained_model_name_or_path)
        if model is not None:
            return load_adapter(model, path, trust_code=trust_code).eval()
        return load_for_inference(None, path, dtype=dtype, trust_code=trust_code, cls=GraftedModel).gm

    # ---- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, synced_gpus=None,
                 assistant_model=None, streamer=None, negative_prompt_ids=None, negative_prompt_attention_mask=None,
                 use_model_defaults=None, custom_generate=None, **kwargs):
        """``GenerationMixin.generate`` for greedy and sampled decoding, on graftr's KV-cache graph.

        The generation config is merged from ``generation_config``, ``model.generation_config`` and ``kwargs`` by
        transformers' own code, as are the logits processors (temperature, top-k/p, repetition penalty, min
        length, ...) and the stopping criteria (max length, EOS, ``stop_strings`` with ``tokenizer=``, user
        criteria); rows that have stopped get the pad token. Returns the sequences (prompt included for a
        decoder-only model, the decoder sequence from its start token for an encoder-decoder), or a
        ``Generate*Output`` with ``return_dict_in_generate`` (``scores``/``logits`` when asked). Beam search,
        assisted and contrastive decoding, ``inputs_embeds`` and negative prompts are refused."""
        from transformers.generation.configuration_utils import GenerationMode
        from transformers.generation.logits_process import LogitsProcessorList
        from transformers.generation.stopping_criteria import StoppingCriteriaList

        from graftr.generate import generate_ids

        if self.task not in GENERATIVE_TASKS:
            raise GraftrError(f"generate needs a causal_lm or seq2seq_lm model; this one is {self.task}")
        for name, value in (("assistant_model", assistant_model), ("custom_generate", custom_generate),
                            ("negative_prompt_ids", negative_prompt_ids), ("synced_gpus", synced_gpus or None)):
            if value is not None:
                raise GraftrError(f"generate(): {name} is not supported by a grafted model")
        tokenizer = kwargs.pop("tokenizer", None)
        has_default_max = kwargs.get("max_length") is None and (
            generation_config is None or generation_config.max_length is None) and \
            self.generation_config.max_length is None
        has_default_min = kwargs.get("min_length") is None and (
            generation_config is None or generation_config.min_length is None) and \
            self.generation_config.min_length is None
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        mode = config.get_generation_mode(None)
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise GraftrError(f"generate(): {mode.value.replace('_', ' ')} is not supported by a grafted model "
                              "(greedy and sampled decoding are)")
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise GraftrError("generate() needs input_ids (inputs_embeds are not supported by a grafted model)")
        attention_mask = model_kwargs.pop("attention_mask", None)
        model_kwargs.pop("use_cache", None)
        unused = sorted(k for k, v in model_kwargs.items() if v is not None)
        if unused:
            raise ValueError(f"The following `model_kwargs` are not used by the model: {unused}")
        batch, device = input_ids.shape[0], input_ids.device
        self._prepare_special_tokens(config, attention_mask is not None, device=device, batch_size=batch)
        if attention_mask is None:
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, config, {})
        expand = config.num_return_sequences or 1
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        attention_mask = attention_mask.repeat_interleave(expand, dim=0)
        seq2seq = bool(getattr(self.hf_config, "is_encoder_decoder", False))
        if seq2seq:
            start = config._decoder_start_token_tensor
            start = int(start.flatten()[0]) if start is not None else self._decoder_start()
            sequence = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=device)
        else:
            sequence = input_ids
        config = self._prepare_generated_length(config, has_default_max, has_default_min, "input_ids",
                                                sequence.shape[1], input_ids)
        processors = self._get_logits_processor(
            generation_config=config, input_ids_seq_length=sequence.shape[1], encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
            device=device, model_kwargs={}, negative_prompt_ids=None, negative_prompt_attention_mask=None)
        stopping = self._get_stopping_criteria(
            generation_config=config,
            stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList(),
            tokenizer=tokenizer)
        new = config.max_length - sequence.shape[1]
        if new < 1:
            raise GraftrError(f"generate(): max_length {config.max_length} leaves no room after the "
                              f"{sequence.shape[1]}-token input")
        pad = config._pad_token_tensor
        policy = HFDecoding(sequence, processors, stopping, sample=mode is GenerationMode.SAMPLE,
                            pad=int(pad.flatten()[0]) if pad is not None else None, streamer=streamer,
                            keep_scores=config.return_dict_in_generate and config.output_scores,
                            keep_logits=config.return_dict_in_generate and config.output_logits)
        if streamer is not None:
            streamer.put(sequence.cpu())
        generate_ids(self, input_ids, attention_mask, max_new_tokens=new, eos_token_ids=[],
                     pad_token_id=policy.pad or 0, use_cache=config.use_cache is not False, policy=policy)
        if streamer is not None:
            streamer.end()
        if not config.return_dict_in_generate:
            return policy.sequence
        from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput

        output = GenerateEncoderDecoderOutput if seq2seq else GenerateDecoderOnlyOutput
        return output(sequences=policy.sequence, scores=tuple(policy.scores) if policy.keep_scores else None,
                      logits=tuple(policy.raw) if policy.keep_logits else None)

    def _decoder_start(self) -> int:
        cfg = self.hf_config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        if start is None:
            raise GraftrError("the model config names no decoder_start_token_id (nor pad_token_id)")
        return int(start)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise GraftrError("a grafted model generates with its own KV cache: call model.generate(...)")


class GraftedModel(grafted.GraftedModel, HFModelMixin):
    """A grafted model that is a ``transformers.PreTrainedModel`` (and ``GenerationMixin``) with the interface of
    the HF class it was traced from: :func:`graftr.graft` and :func:`graftr.load_adapter` return one."""

    def adopt_interface(self, model: nn.Module) -> None:
        super().adopt_interface(model)
        cls, hf_cls = type(self), type(model)
        for name in _CLASS_ATTRIBUTES:
            if hasattr(hf_cls, name):
                setattr(cls, name, getattr(hf_cls, name))
        self.loss_type = _loss_type(hf_cls.__name__)


class HFDecoding:
    """One token per row per step, as ``GenerationMixin._sample`` chooses it: the logits processors on the fp32
    logits, then arg-max or a draw from the softmax (torch's global generator, as HF's), the pad token for rows
    already stopped, then the stopping criteria on the sequence so far. ``graftr.generate.generate_ids`` runs the
    graph and calls it once per step."""

    def __init__(self, sequence, processors, stopping, *, sample: bool, pad: int | None, streamer=None,
                 keep_scores: bool = False, keep_logits: bool = False):
        self.sequence, self.processors, self.stopping = sequence, processors, stopping
        self.sample, self.pad, self.streamer = sample, pad, streamer
        self.keep_scores, self.keep_logits = keep_scores, keep_logits
        self.unfinished = torch.ones(sequence.shape[0], dtype=torch.bool, device=sequence.device)
        self.scores: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next tokens, which rows are done) from the step's (B, V) logits."""
        logits = logits.to(device=self.sequence.device, dtype=torch.float32, copy=True)
        scores = self.processors(self.sequence, logits)
        if self.keep_logits:
            self.raw.append(logits)
        if self.keep_scores:
            self.scores.append(scores)
        if self.sample:
            token = torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        if self.pad is not None:
            token = torch.where(self.unfinished, token, self.pad)
        self.sequence = torch.cat([self.sequence, token[:, None]], dim=-1)
        if self.streamer is not None:
            self.streamer.put(token.cpu())
        self.unfinished &= ~self.stopping(self.sequence, scores)
        return token, ~self.unfinished

