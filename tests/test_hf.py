"""A grafted model is a transformers PreTrainedModel: the interface HF tools read, generate with HF semantics,
save_pretrained/from_pretrained, and transformers.Trainer and TRL's SFTTrainer (its default config included),
DPOTrainer (no reference model copy) and GRPOTrainer training it as they find it."""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
from after_training_kit import model_dir, tokenizer
from zoo import tiny_model

from graftr import GraftedModel, graft, prepare
from graftr.errors import GraftrError
from graftr.recipe import parse_recipe

IA3 = """
name: ia3_kv_down
rules:
  - {name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
  - {name: ia3_ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3}}
"""
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "birds sing in the morning",
         "rain falls on the roof", "she reads a good book", "we walk to the river", "the tea is hot"]


@functools.cache
def prepared(arch: str):
    """A tiny model of ``arch`` and its graph without adapters, in eval mode (traced once per test session)."""
    model = tiny_model(arch)
    return model, prepare(model).eval()


def test_is_a_pretrained_model_with_the_hf_class_interface():
    from transformers import GenerationMixin, PreTrainedModel

    model = tiny_model("llama")
    gm = graft(model, parse_recipe(IA3)).eval()
    assert isinstance(gm, PreTrainedModel) and isinstance(gm, GenerationMixin)
    assert gm.config is model.config and gm.device == torch.device("cpu") and gm.dtype == torch.float32
    assert gm.generation_config.eos_token_id == model.config.eos_token_id
    assert gm.base_model_prefix == type(model).base_model_prefix and gm.main_input_name == "input_ids"
    assert gm.loss_type == "ForCausalLM" and gm.accepts_loss_kwargs
    # the HF class's own forward parameters, shown where Trainer and generate look for them
    assert list(inspect.signature(gm.forward).parameters) == list(inspect.signature(model.forward).parameters)
    assert gm.get_input_embeddings().weight is model.model.embed_tokens.weight
    head = gm.get_output_embeddings()
    assert head.weight is model.lm_head.weight and head.bias is None
    assert gm.num_parameters(only_trainable=True) == gm.trainable_counts()[0] == 2 * (16 + 16 + 32)
    ids = torch.randint(3, 128, (2, 9))
    by_keyword = gm(input_ids=ids).logits
    assert torch.equal(gm(ids).logits, by_keyword)  # positional input_ids
    assert torch.equal(gm(ids, logits_to_keep=1).logits, by_keyword[:, -1:])
    assert torch.equal(gm.base_model(ids).last_hidden_state @ model.lm_head.weight.T, by_keyword)
    with pytest.raises(GraftrError, match="inputs_embeds: not supported"):
        gm(inputs_embeds=torch.zeros(2, 9, 32))
    with pytest.raises(TypeError, match="unexpected keyword"):
        gm(ids, not_an_argument=1)
    gm.add_model_tags(["sft"])
    assert gm.model_tags == ["sft"]


def test_num_items_in_batch_makes_the_loss_a_sum_over_the_batch():
    """Trainer passes the token count of the whole accumulated batch; the loss is then sum / count, in training
    (fused, no logits) and in eval alike, as transformers' ForCausalLMLoss computes it."""
    gm = prepared("llama")[1]
    ids = torch.randint(3, 128, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    scored = int(labels[:, 1:].ne(-100).sum())
    for mode in (True, False):
        gm.train(mode)
        mean = gm(ids, labels=labels).loss
        total = gm(ids, labels=labels, num_items_in_batch=torch.tensor(3 * scored)).loss
        torch.testing.assert_close(total, mean / 3)
    gm.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_hf_generate(arch):
    """Greedy, sampled (same seed), repetition penalty, num_return_sequences, left padding, stopping criteria:
    the tokens transformers' own generate gives on the HF model."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, gm = prepared(arch)
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    cases = [dict(max_new_tokens=9, do_sample=False),
             dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=2),
             dict(max_new_tokens=5, do_sample=False, repetition_penalty=1.3),
             dict(max_length=12, do_sample=False, return_dict_in_generate=True, output_scores=True)]
    for kwargs in cases:
        torch.manual_seed(3)
        ours = gm.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)
        torch.manual_seed(3)
        theirs = model.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)
        if kwargs.get("return_dict_in_generate"):
            assert torch.equal(ours.sequences, theirs.sequences)
            assert len(ours.scores) == len(theirs.scores)
            torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-4, rtol=1e-4)
        else:
            assert torch.equal(ours, theirs), kwargs

    class StopAfter(StoppingCriteria):  # row 0 stops after 2 new tokens: it gets pad tokens from then on
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([input_ids.shape[1] >= 9, False])

    stop = StoppingCriteriaList([StopAfter()])
    ours = gm.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, stopping_criteria=stop)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, stopping_criteria=stop)
    assert torch.equal(ours, theirs) and (ours[0, 9:] == 0).all()
    with pytest.raises(GraftrError, match="beam search"):
        gm.generate(ids, num_beams=2, max_new_tokens=2)


def test_save_pretrained_writes_an_adapter_and_from_pretrained_reads_it(tmp_path, capsys):
    base = model_dir(tmp_path / "base", "llama")
    gm = graft(base, parse_recipe(IA3))
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    gm.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "manifest.json", "notes.txt",
                                                      "recipe.yaml"]
    assert not list(tmp_path.glob(".out*"))  # no staging directory left
    again = GraftedModel.from_pretrained(out)  # the base recorded in the adapter, with its weights
    ids = torch.randint(3, 500, (2, 8))
    assert torch.equal(again(ids).logits, gm.eval()(ids).logits)
    gm.print_trainable_parameters()
    assert "trainable params: 128 || all params:" in capsys.readouterr().out
    with pytest.raises(GraftrError, match="no adapters to save"):
        prepared("llama")[1].save_pretrained(tmp_path / "bare")


# ------------------------------------------------------------------------------------------ Trainer and TRL


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """A tiny Llama sized to the offline tokenizer, grafted, and its initial state (each test starts from it)."""
    gm = graft(model_dir(tmp_path_factory.mktemp("hf") / "base", "llama"), parse_recipe(IA3))
    return gm, {n: t.clone() for n, t in gm.state_dict().items()}


@pytest.fixture
def fresh(grafted):
    gm, initial = grafted
    gm.load_state_dict(initial)
    gm.train()
    return gm


def train_and_check(trainer, tmp_path):
    """Train: the loss on the training data falls, exactly the adapter tensors change, and ``save_model`` writes
    the adapter: its tensors and recipe (such a directory reloads equal, see
    test_save_pretrained_writes_an_adapter_and_from_pretrained_reads_it)."""
    from safetensors.torch import load_file

    from graftr.formats.graftr import read_manifest
    from graftr.recipe import dump_recipe, load_recipe

    gm = trainer.model
    before = {n: t.clone() for n, t in gm.state_dict().items()}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before - 0.01
    adapter = set(gm.adapter_state_dict())
    changed = {n for n, t in gm.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == adapter
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    assert not (saved / "model.safetensors").exists()
    tensors = load_file(str(saved / "adapter.safetensors"))
    assert sorted(tensors) == sorted(adapter)
    for name, tensor in gm.adapter_state_dict().items():
        assert torch.equal(tensors[name], tensor.detach().cpu()), name
    assert dump_recipe(load_recipe(saved / "recipe.yaml")) == dump_recipe(gm.recipe)
    assert read_manifest(saved)["base_model"] == gm.model_id


def test_transformers_trainer_trains_and_saves_the_adapter(fresh, tmp_path):
    """Default TrainingArguments (remove_unused_columns=True included: the text column is dropped because the
    forward signature is the HF model's)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tokenizer()
    gm = fresh
    rows = tok(TEXTS)
    data = Dataset.from_dict({"text": TEXTS, "input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]})
    args = TrainingArguments(str(tmp_path / "run"), max_steps=8, learning_rate=5e-2, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, report_to="none", save_strategy="no")
    trainer = Trainer(model=gm, args=args, train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    train_and_check(trainer, tmp_path)


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def sft_dataset(kind: str):
    from datasets import Dataset

    if kind == "text":
        return Dataset.from_dict({"text": TEXTS})
    pairs = [(t.rsplit(" ", 2)[0], " ".join(t.rsplit(" ", 2)[1:])) for t in TEXTS]
    if kind == "alpaca":  # alpaca rows, as prompt/completion (completion-only loss)
        from graftr.data import format_prompt

        return Dataset.from_dict({"prompt": [format_prompt({"instruction": p, "input": ""}, "alpaca") for p, _ in pairs],
                                  "completion": [c for _, c in pairs]})
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                           for p, c in pairs]})


@pytest.mark.parametrize("kind", ["text", "alpaca", "chat"])
def test_trl_sft_trainer_trains_without_a_peft_config(fresh, tmp_path, kind):
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    # TRL turns on activation checkpointing and bf16 by default (see docs/hf.md)
    args = SFTConfig(str(tmp_path / "run"), max_steps=8, learning_rate=5e-2, per_device_train_batch_size=4,
                     report_to="none", save_strategy="no", max_length=48, activation_checkpointing=False, bf16=False)
    data = sft_dataset(kind)
    trainer = SFTTrainer(model=fresh, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    train_and_check(trainer, tmp_path)


@pytest.fixture
def own(tmp_path):
    """A grafted model of its own: a trainer with bf16 (TRL's default) leaves accelerate's autocast wrapper on the
    model's forward, which the next trainer would wrap again."""
    return graft(model_dir(tmp_path / "base", "llama"), parse_recipe(IA3)).train()


def test_trl_sft_trainer_with_its_default_config(own, tmp_path):
    """TRL's defaults: activation checkpointing (the layers outlined) and bf16, and its fused LM head calling
    ``base_model`` on the outlined graph. ``use_cpu`` only because this machine has no GPU (TRL's bf16 default
    needs it said)."""
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer()
    args = SFTConfig(str(tmp_path / "run"), max_steps=8, learning_rate=5e-2, per_device_train_batch_size=4,
                     report_to="none", save_strategy="no", max_length=48, use_cpu=True)
    assert args.bf16 and args.activation_checkpointing
    data = sft_dataset("text")
    trainer = SFTTrainer(model=own, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    train_and_check(trainer, tmp_path)
    assert own.is_gradient_checkpointing and own.graftr_outlined


PREFERENCES = [(t.rsplit(" ", 2)[0], " ".join(t.rsplit(" ", 2)[1:])) for t in TEXTS]


def test_trl_dpo_trainer_without_a_reference_model(own, tmp_path):
    """``ref_model=None``: TRL takes the reference from ``disable_adapter`` only for a ``peft.PeftModel``; for any
    other model it would load the base a second time, unless ``precompute_ref_log_probs``: the reference
    log-probabilities are computed once, before training, by the model itself, which at graftr's identity init is
    exactly its base (and with a trained adapter, that adapter, as TRL's "ref" adapter copy for PEFT)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({"prompt": [p for p, _ in PREFERENCES], "chosen": [c for _, c in PREFERENCES],
                              "rejected": [c for _, c in PREFERENCES[1:] + PREFERENCES[:1]]})
    args = DPOConfig(str(tmp_path / "run"), max_steps=8, learning_rate=5e-2, per_device_train_batch_size=4,
                     report_to="none", save_strategy="no", use_cpu=True, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=own, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer())
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names  # no copy
    before = {n: t.clone() for n, t in own.state_dict().items()}
    start = trainer.evaluate()
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its reference at init
    assert abs(start["eval_rewards/chosen"]) < 1e-6 and abs(start["eval_rewards/rejected"]) < 1e-6
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_loss"] < start["eval_loss"] - 0.002 and end["eval_rewards/margins"] > 0
    changed = {n for n, t in own.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == set(own.adapter_state_dict())


def test_trl_grpo_trainer_with_a_reward_function(own, tmp_path):
    """An online trainer: completions generated by the grafted model (``generate`` on graftr's KV cache), scored by
    a reward function; GRPO's default ``beta=0`` needs no reference model. GRPO's loss is 0 at every on-policy step
    by construction, so the policy's move shows in the likelihood of fixed texts."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = tokenizer()

    def shorter_words(completions, **kwargs):
        return [-sum(len(w) for w in c.split()) / max(len(c.split()), 1) for c in completions]

    args = GRPOConfig(str(tmp_path / "run"), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to="none", save_strategy="no",
                      use_cpu=True, logging_steps=1)
    data = Dataset.from_dict({"prompt": [p for p, _ in PREFERENCES]})
    trainer = GRPOTrainer(model=own, reward_funcs=shorter_words, args=args, train_dataset=data,
                          processing_class=tok)
    assert trainer.ref_model is None
    ids = tok(TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss_before = own.eval()(**ids, labels=labels).loss
    before = {n: t.clone() for n, t in own.state_dict().items()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == 3 and all(h["grad_norm"] > 0 for h in logged)
    changed = {n for n, t in own.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == set(own.adapter_state_dict())
    with torch.no_grad():
        assert own.eval()(**ids, labels=labels).loss != loss_before
