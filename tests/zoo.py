"""Tiny random models of every architecture graftr supports, for fast tests.

Each model has 2 layers (T5: 2 encoder + 2 decoder), hidden size 32, a 128-token vocabulary and under 100k
parameters. Dropouts are 0 unless a test overrides them. Mistral and Gemma-2 get a sliding window shorter than
the test sequences so windowed attention is exercised.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from transformers import AutoConfig, PretrainedConfig

from graftr.models import build_model
from graftr.trace import default_position_ids, export, to_graph_module, trace_spec

VOCAB = 128
MAX_POSITIONS = 64

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": {**_DECODER, "sliding_window": 6},
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 8},
    "gemma2": {**_DECODER, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 6},
    "phi3": {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": {**_DECODER, "num_key_value_heads": None, "hidden_dropout": 0.0},
    "opt": dict(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0,
                pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bert": {**_ENCODER, "max_position_embeddings": MAX_POSITIONS, "type_vocab_size": 2, "pad_token_id": 0},
    # RoBERTa positions start after the padding index, hence the 2 extra.
    "roberta": {**_ENCODER, "max_position_embeddings": MAX_POSITIONS + 2, "type_vocab_size": 1,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "t5": dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}

# Mixture-of-Experts: 8 experts, top-2, fused 3-D expert weights (transformers 5). gpt-oss is transposed, with
# biases and interleaved gate/up; Qwen2-MoE adds a shared expert. Not in ARCHS: tests/test_moe.py covers them.
_MOE = {**_DECODER, "intermediate_size": 16}
_CONFIGS.update({
    "qwen3_moe": {**_MOE, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2},
    "mixtral": {**_MOE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {**_MOE, "num_experts": 8, "num_experts_per_tok": 2},
    "gpt_oss": {**_MOE, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"]},
    "qwen2_moe": {**_MOE, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32, "num_experts": 8,
                  "num_experts_per_tok": 2},
})
MOE_ARCHS = ["qwen3_moe", "mixtral", "gpt_oss", "olmoe"]

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "bert", "roberta", "t5"]

# Token ids below this are special (padding, bos, eos) and left out of random inputs.
_FIRST_PLAIN_TOKEN = 3


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """A tiny config of ``arch`` (a model_type from :data:`ARCHS`); ``overrides`` are config fields."""
    kwargs = {k: v for k, v in {**_CONFIGS[arch], **overrides}.items() if v is not None}
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, task: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """An fp32 CPU model in eval mode, initialised deterministically from ``seed``.

    On top of the HF init every parameter gets N(0, 0.05) noise, so zero biases and unit norm weights do not
    hide a term the graph might drop.
    """
    torch.manual_seed(seed)
    model = build_model(tiny_config(arch, **overrides), task, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _mask(batch: int, seq: int) -> torch.Tensor:
    """All ones, except that row i > 0 has its last 2*i positions (at most seq - 1) padded."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, max(1, seq - 2 * row):] = 0
    return mask


def example_inputs(model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs named as :func:`graftr.trace.trace_spec` traces them, right-padded when ``batch > 1``.

    Encoder-decoder models get a decoder sequence one shorter than ``seq`` (at least 1), so the two sequence
    dimensions differ.
    """
    gen = torch.Generator().manual_seed(seed)
    spec = trace_spec(model)
    config = model.config
    inputs = {}
    for name in spec.input_names:
        length = max(1, seq - 1) if name in spec.decoder_inputs else seq
        if name.endswith("input_ids"):
            inputs[name] = torch.randint(_FIRST_PLAIN_TOKEN, config.vocab_size, (batch, length), generator=gen)
        elif name == "token_type_ids":
            inputs[name] = torch.randint(0, config.type_vocab_size, (batch, length), generator=gen)
        elif name == "position_ids":  # the positions the model uses by default (the mask comes before them)
            inputs[name] = default_position_ids(spec.position_ids, inputs["attention_mask"])
        else:
            inputs[name] = _mask(batch, length)
    return inputs


# IA³'s targets per family, as HF PEFT places them: the attention projections whose outputs are scaled, and the
# feed-forward layer whose input is scaled.
IA3_TARGETS = {
    "llama": ("model.layers.*.self_attn.{k_proj,v_proj}", "model.layers.*.mlp.down_proj"),
    "gpt2": ("transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_proj"),
    "bert": ("bert.encoder.layer.*.attention.self.{key,value}", "bert.encoder.layer.*.output.dense"),
}
BERT_CLASSIFIER = "task: seq_cls\nnum_labels: 3\ntrainable_modules: [classifier]\n"  # a recipe header


def ia3_recipe(output_path: str, input_path: str, header: str = "") -> str:
    """An IA³ recipe: rule ``ia3_attn`` scales the outputs at ``output_path``, ``ia3_ff`` the inputs at ``input_path``."""
    return f"""
name: ia3
{header}rules:
  - {{name: ia3_attn, match: {{path: "{output_path}"}}, adapter: {{kind: ia3}}}}
  - {{name: ia3_ff, match: {{path: "{input_path}"}}, adapter: {{kind: ia3, scale: input}}}}
"""


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` exported and normalized into a plain GraphModule (parameters shared with ``model``, not copied),
    without the grafted model's wrapper: what :func:`graftr.prepare` traces."""
    spec = trace_spec(model)
    gm = to_graph_module(export(model, spec), class_name=type(model).__name__)
    gm.graftr_input_names = list(spec.input_names)
    gm.graftr_max_positions = spec.max_positions
    gm.graftr_position_ids = spec.position_ids
    return gm


def param_count(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
