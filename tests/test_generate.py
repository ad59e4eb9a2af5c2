"""Generation: the KV cache gives the same tokens and logits as recomputing, sampling, stopping, prompts, CLI."""

from __future__ import annotations

import functools

import pytest
import torch
from after_training_kit import cli_error, model_dir, tokenizer
from zoo import tiny_model

from graftr import cli, graft, prepare, save_adapter
from graftr.cache import CachedSDPA, KVCache, enable_kv_cache, kv_cache_support
from graftr.errors import GraftrError
from graftr.generate import Sampling, generate_ids, generate_text, template_prompts
from graftr.recipe import parse_recipe
from graftr.registry import kinds

# IA³ on every linear layer of every block (outputs of attention projections, inputs of the rest do not matter
# here: the point is adapters on the graph the cache runs).
IA3_ALL = """
name: ia3_all
rules:
  - name: ia3
    match: {op: linear, layers: {last: 2}}
    adapter: {kind: ia3}
"""
TRAIN = "train: {{lr: 1.0e-3, max_steps: 1, data: {{format: {fmt}}}}}\n"  # a recipe's training section
EOS, PAD = 2, 0


@functools.cache
def grafted(arch: str, recipe: str = IA3_ALL):
    """A tiny model of ``arch`` with the recipe's adapters, their parameters moved away from identity."""
    torch.manual_seed(1)
    model = tiny_model(arch)
    gm = graft(model, parse_recipe(recipe))
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    return model, gm.eval()


@functools.cache
def base(arch: str):
    """A tiny model of ``arch`` and its graph without adapters."""
    model = tiny_model(arch)
    return model, prepare(model).eval()


def two_prompts(lengths=(9, 4), seed=0):
    """Two left-padded prompts of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 128, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def run(gm, ids, mask, use_cache, new=12, sampling=Sampling(), eos=(EOS,)):
    logits = []
    result = generate_ids(gm, ids, mask, max_new_tokens=new, eos_token_ids=list(eos), pad_token_id=PAD,
                          sampling=sampling, use_cache=use_cache, on_logits=lambda step, l: logits.append(l.clone()))
    return result, logits


# Mistral's tiny config has a sliding window of 6, shorter than prompt + generation: the cache must apply it.
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "opt", "gpt_neox", "phi3"])
def test_cache_equals_recomputation(arch):
    _, gm = grafted(arch)
    ids, mask = two_prompts()
    cached, cached_logits = run(gm, ids, mask, use_cache=True)
    full, full_logits = run(gm, ids, mask, use_cache=False)
    assert cached.cached and cached.note is None and not full.cached
    assert cached.tokens.shape == (2, 12)
    assert torch.equal(cached.tokens, full.tokens)
    assert len(cached_logits) == len(full_logits) == 12
    for step, (a, b) in enumerate(zip(cached_logits, full_logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"step {step}: {m}")


def test_cache_matches_transformers_generate():
    model, gm = base("llama")
    ids, mask = two_prompts((7, 3), seed=1)
    ours = run(gm, ids, mask, use_cache=True, new=10)[0]
    assert ours.cached
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(ours.tokens[:, :reference.shape[1]], reference)


def test_llama_cache_keeps_one_copy_per_kv_head():
    _, gm = grafted("llama")
    enable_kv_cache(gm)
    sites = [m for m in gm.modules() if isinstance(m, CachedSDPA)]
    assert len(sites) == 2 and {(m.kv_heads, m.window) for m in sites} == {(2, None)}
    ids, mask = two_prompts()
    cache = KVCache(2, ids.shape[1] + 1)
    with cache.step(mask):
        gm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    keys, values, group = cache._buffers[sites[0]]
    # the graph hands SDPA the 2 key/value heads (enable_gqa), so the buffers hold them as they come
    assert all(m.enable_gqa for m in sites) and group == 1
    assert keys.shape == values.shape == (2, 2, ids.shape[1] + 1, 8)
    assert cache.length == ids.shape[1]


def test_mistral_sliding_window_is_per_site():
    _, gm = grafted("mistral")
    enable_kv_cache(gm)
    assert {m.window for m in gm.modules() if isinstance(m, CachedSDPA)} == {6}


@pytest.mark.skipif("gated_prompt" not in kinds(), reason="the gated_prompt adapter kind is not registered")
def test_cache_with_gated_prompts():
    recipe = """
name: gp
rules:
  - name: prompt
    match: {op: attention, layers: {last: 2}}
    adapter: {kind: gated_prompt}
"""
    _, gm = grafted("llama", recipe)
    ids, mask = two_prompts()
    cached, cached_logits = run(gm, ids, mask, use_cache=True)
    full, full_logits = run(gm, ids, mask, use_cache=False)
    assert cached.cached and torch.equal(cached.tokens, full.tokens)
    for a, b in zip(cached_logits, full_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_cache_leaves_outputs_unchanged():
    model, gm = grafted("gpt2")
    ids, mask = two_prompts()
    before = gm(input_ids=ids, attention_mask=mask).logits
    enable_kv_cache(gm)
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_graph_fills_the_models_default_positions(arch):
    """position_ids is a graph input; left out, the wrapper uses what the HF forward would (OPT: from the mask)."""
    model, gm = base(arch)
    assert "position_ids" in gm.graftr_input_names
    ids, mask = two_prompts()
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


def test_fallback_for_eager_attention_is_correct():
    model, gm = base("gemma2")
    assert "gemma2" in kv_cache_support(gm)
    ids, mask = two_prompts((6, 3))
    result = run(gm, ids, mask, use_cache=True, new=6)[0]
    assert not result.cached and "gemma2" in result.note
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(result.tokens[:, :reference.shape[1]], reference)


def test_encoder_decoder_recomputes_and_matches_transformers():
    model, gm = base("t5")
    ids, mask = two_prompts((6, 3))
    result = generate_ids(gm, ids, mask, max_new_tokens=5, eos_token_ids=[1], pad_token_id=PAD)
    assert not result.cached and "encoder-decoder" in result.note
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               eos_token_id=1, pad_token_id=PAD)[:, 1:]  # HF's starts with the start token
    assert torch.equal(result.tokens[:, :reference.shape[1]], reference)


def test_stops_at_eos_and_pads_finished_rows():
    _, gm = grafted("llama")
    ids, mask = two_prompts()
    free = run(gm, ids, mask, use_cache=True, new=6)[0].tokens
    eos = int(free[0, 2])  # make row 0's third token an EOS
    assert eos not in free[1].tolist()
    for use_cache in (True, False):
        tokens = run(gm, ids, mask, use_cache=use_cache, new=6, eos=(eos,))[0].tokens
        assert tokens[0].tolist() == free[0, :3].tolist() + [PAD] * 3
        assert torch.equal(tokens[1], free[1])
    first = int(free[0, 0]), int(free[1, 0])  # every row ends at once: generation stops after one step
    assert run(gm, ids, mask, use_cache=True, new=6, eos=first)[0].tokens.shape == (2, 1)


def test_sampling():
    _, gm = grafted("llama")
    ids, mask = two_prompts()
    greedy = run(gm, ids, mask, use_cache=True)[0].tokens
    assert torch.equal(run(gm, ids, mask, True, sampling=Sampling(temperature=0.7, top_k=1, seed=3))[0].tokens, greedy)
    assert torch.equal(run(gm, ids, mask, True, sampling=Sampling(temperature=0.7, top_p=1e-6, seed=3))[0].tokens,
                       greedy)
    hot = Sampling(temperature=5.0, seed=3)
    first = run(gm, ids, mask, True, sampling=hot)[0].tokens
    assert torch.equal(run(gm, ids, mask, False, sampling=hot)[0].tokens, first)  # same seed, same tokens
    assert not torch.equal(first, greedy)
    assert not torch.equal(run(gm, ids, mask, True, sampling=Sampling(temperature=5.0, seed=4))[0].tokens, first)
    with pytest.raises(GraftrError, match="top_p"):
        Sampling(temperature=1.0, top_p=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(Sampling(temperature=1.0, top_p=0.8).choose(logits, torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}
    seen = {int(Sampling(temperature=1.0, top_k=3).choose(logits, torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1, 2}


def test_bad_inputs_are_refused():
    _, gm = grafted("llama")
    ids, mask = two_prompts()
    with pytest.raises(GraftrError, match="positions"):
        generate_ids(gm, ids, mask, max_new_tokens=gm.graftr_max_positions, eos_token_ids=[EOS], pad_token_id=PAD)
    with pytest.raises(GraftrError, match="left-padded"):
        generate_ids(gm, ids.flip(1), mask.flip(1), max_new_tokens=2, eos_token_ids=[EOS], pad_token_id=PAD)


# --------------------------------------------------------------------------------------------- text and CLI


def test_prompt_templates():
    tok = tokenizer()
    alpaca = parse_recipe(IA3_ALL + TRAIN.format(fmt="alpaca"))
    (text,), special = template_prompts(["Name a colour."], alpaca, tok)
    assert special and text.endswith("### Instruction:\nName a colour.\n\n### Response:")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = parse_recipe(IA3_ALL + TRAIN.format(fmt="chat"))
    assert template_prompts(["hi"], chat, tok) == (["<user>hi<assistant>"], False)
    assert template_prompts(["hi"], parse_recipe(IA3_ALL), tok) == (["hi"], True)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny llama with the offline tokenizer, and an IA³ adapter for it trained on (declared) alpaca data."""
    root = tmp_path_factory.mktemp("gen")
    model = model_dir(root / "base", "llama")
    gm = graft(model, parse_recipe(IA3_ALL + TRAIN.format(fmt="alpaca")))
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    save_adapter(gm, root / "adapter")
    return root, gm.eval()


def test_cli_generate_prints_the_completions(text_model, capsys):
    root, gm = text_model
    prompts = ["Name a colour.", "Write one word about the sea and the sky."]
    code = cli.main(["generate", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                     "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected, result = generate_text(gm, tokenizer(), prompts, max_new_tokens=6, recipe=gm.recipe)
    assert result.cached and all(expected)
    assert captured.out.splitlines()[-4:] == ["--- 1", expected[0], "--- 2", expected[1]]
    assert "KV cache" in captured.err


def test_cli_generate_errors(text_model, tmp_path, capsys):
    root, _ = text_model
    model_dir(tmp_path / "wide", "llama", hidden_size=64)
    cases = [
        (["--model", str(root / "base"), "--adapter", str(tmp_path / "nope")], "does not exist"),
        (["--model", str(tmp_path / "wide"), "--adapter", str(root / "adapter")], "hidden_size: adapter 32 vs model 64"),
        (["--model", "meta-llama/Llama-2-7b-hf"], "only a config"),
        (["--model", str(root / "base"), "--temperature", "-1"], "temperature"),
    ]
    for flags, message in cases:
        assert message in cli_error(capsys, ["generate", *flags, "--prompt", "hi"])
