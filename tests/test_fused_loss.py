"""The training-mode LM loss computed from the head's input (graftr.loss): transformers' loss and gradients, no
logits kept for backward, and the plain path wherever the head is not one frozen linear."""

import pytest
import torch
import torch.nn.functional as F
from zoo import example_inputs, tiny_model

from graftr import graft, loss as fused
from graftr.grafted import prepare
from graftr.recipe import parse_recipe

LM_TASKS = {"bert": "masked_lm", "roberta": "masked_lm"}  # every other family in the zoo is a causal or seq2seq LM
FUSED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt", "bert", "roberta", "t5"]


def _lm(arch: str):
    """The HF model, its grafted twin (parameters shared), a batch with labels (some ignored), and the head weight."""
    model = tiny_model(arch, LM_TASKS.get(arch))
    batch = example_inputs(model, 3, 9)
    labels = batch.pop("decoder_input_ids", batch["input_ids"]).clone()
    batch.pop("decoder_attention_mask", None)
    labels[0, :4] = -100
    labels[2, -1] = -100
    gm = prepare(model).train()
    model.train()
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in head)  # the body trains, the head (and an embedding tied to it) is frozen
    return model, gm, batch, labels


def _loss_and_grads(module, batch, labels):
    for p in module.parameters():
        p.grad = None
    out = module(**batch, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", FUSED)
def test_training_loss_and_gradients_equal_transformers_without_logits(arch):
    model, gm, batch, labels = _lm(arch)
    ref, ref_grads = _loss_and_grads(model, batch, labels)
    out, grads = _loss_and_grads(gm, batch, labels)
    assert out.logits is None  # the fused path ran
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 4
    scale = max(g.abs().max().item() for g in ref_grads.values())  # fp32 rounding (1/n is applied after W's product;
    for name, grad in grads.items():                                # a key bias's gradient is rounding alone)
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    gm.eval()  # evaluation returns the logits, and the same loss
    with torch.no_grad():
        evaluated = gm(**batch, labels=labels)
    assert evaluated.logits.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(evaluated.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_the_plain_path_where_the_head_is_not_one_frozen_linear():
    # Gemma-2 soft-caps its logits after the head
    model, gm, batch, labels = _lm("gemma2")
    ref, _ = _loss_and_grads(model, batch, labels)
    out, _ = _loss_and_grads(gm, batch, labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    # a trainable head
    model, gm, batch, labels = _lm("llama")
    model.lm_head.weight.requires_grad_(True)
    ref, ref_grads = _loss_and_grads(model, batch, labels)
    out, grads = _loss_and_grads(gm, batch, labels)
    assert out.logits is not None
    torch.testing.assert_close(grads["lm_head.weight"], ref_grads["lm_head.weight"])
    # an adapter on the head's output
    model = tiny_model("llama")
    gm = graft(model, parse_recipe("""
name: head
rules:
  - {name: head, match: {path: lm_head}, adapter: {kind: ina, rank: 2, inhibition: 0.3}}
""")).train()
    ids = example_inputs(model, 2, 5)["input_ids"]
    assert gm(input_ids=ids, labels=ids).logits is not None
    # opting out
    model, gm, batch, labels = _lm("llama")
    gm.fused_loss = False
    assert gm(**batch, labels=labels).logits is not None


def test_backward_keeps_nothing_the_size_of_the_logits():
    model, gm, batch, labels = _lm("llama")
    logits_numel = labels.numel() * model.config.vocab_size
    for fused_loss, expect_logits_sized in ((False, True), (True, False)):
        gm.fused_loss = fused_loss
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            gm(**batch, labels=labels)
        assert (max(saved) >= logits_numel) == expect_logits_sized


@pytest.mark.parametrize("masked", [False, True], ids=["ignored-rows-skipped", "ignored-rows-masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_in_chunks_equals_cross_entropy_of_the_logits(monkeypatch, dtype, masked):
    if masked:  # the compiled path: every row computed, the ignored ones masked
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=gen).to(dtype).requires_grad_()
    weight, bias = (torch.randn(50, 16, generator=gen) / 4).to(dtype), torch.randn(50, generator=gen).to(dtype)
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    labels[1, 2:5] = -100
    monkeypatch.setattr(fused, "CHUNK_BYTES", 4 * 50 * 3)  # chunks of 3 tokens: 5 chunks, the last one short
    for shift in (False, True):
        ref_hidden = hidden.detach().clone().requires_grad_()
        logits = F.linear(ref_hidden, weight, bias).float()
        target = F.pad(labels, (0, 1), value=-100)[..., 1:] if shift else labels
        ref = F.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), ignore_index=-100)
        (2 * ref).backward()
        hidden.grad = None
        got = fused.linear_cross_entropy(hidden, weight, bias, labels, shift=shift)
        (2 * got).backward()
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    ignored = torch.full_like(labels, -100)  # nothing scored: nan, as transformers' mean gives
    assert torch.isnan(fused.linear_cross_entropy(hidden, weight, None, ignored, shift=False))
    with pytest.raises(ValueError, match="frozen"):
        fused.linear_cross_entropy(hidden, weight.requires_grad_(), None, labels, shift=False)


def test_a_scratch_is_reused_across_calls_and_changes_no_result(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 8, generator=gen)
    batches = [(torch.randn(3, 5, 8, generator=gen, requires_grad=True), torch.randint(0, 40, (3, 5), generator=gen))
               for _ in range(2)]
    monkeypatch.setattr(fused, "CHUNK_BYTES", 4 * 40 * 4)  # chunks of 4 rows
    refs = []
    for hidden, labels in batches:
        ref_hidden = hidden.detach().clone().requires_grad_()
        ref = F.cross_entropy(F.linear(ref_hidden, weight).reshape(-1, 40), labels.reshape(-1))
        ref.backward()
        refs.append((ref, ref_hidden.grad))
    scratch = fused.Scratch()
    losses = [fused.linear_cross_entropy(h, weight, None, y, shift=False, scratch=scratch) for h, y in batches]
    buffer = scratch.buffer
    assert buffer is not None and buffer.numel() == 4 * 40  # one chunk's logits, kept
    for loss, (hidden, _), (ref, ref_grad) in zip(losses, batches, refs):  # both backwards after both forwards:
        loss.backward()                                                    # nothing depends on the scratch's content
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(hidden.grad, ref_grad)
    assert scratch.buffer is buffer  # reused, not reallocated
    model, gm, batch, labels = _lm("llama")
    gm(**batch, labels=labels)
    assert gm.__dict__["_graftr_scratch"].buffer is not None  # the grafted model keeps one on CPU
