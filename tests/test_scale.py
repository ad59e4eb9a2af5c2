"""Scale: a low-precision base (bf16/fp16 checkpoints, fp32 master weights), activation checkpointing, the memory
estimate.

The models are the tiny Llama of :mod:`after_training_kit` saved in bf16 or fp16; runs are ``graftr train`` in this
process (DeepSpeed with a process group of one) or, for ZeRO-3, two processes through the launcher (slow).
"""

from __future__ import annotations

import os

import pytest
import torch
from after_training_kit import model_dir
from safetensors.torch import load_file
from test_train import INSTRUCTIONS, recipe, records, train_here, write_jsonl

from graftr import cli, graft
from graftr.materialize import build_empty, materialize
from graftr.models import resolve
from graftr.recipe import parse_recipe

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INA_QV = ('{name: ina_qv, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, '
          'adapter: {kind: ina, rank: 4, alpha: 8, dropout: 0.1}}')
TRAIN = """
max_steps: 4
micro_batch_size: 4
lr: 0.02
lr_schedule: constant
log_every: 1
data: {format: alpaca, max_length: 64, eval_split: null}
"""


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny Llama saved as bf16, fp16 and fp32 safetensors (the same values, rounded), and alpaca data."""
    root = tmp_path_factory.mktemp("scale")
    model = model_dir(root / "fp32", "llama")
    for name in ("bf16", "fp16"):
        model_dir(root / name, "llama")  # tokenizer and config
        model.to(DTYPE[name]).save_pretrained(root / name)
        model.float()
    write_jsonl(root / "alpaca.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS])
    return root


def _grafted(root, checkpoint: str, precision: str):
    source = resolve(str(root / checkpoint))
    rec = parse_recipe(f"name: t\nrules:\n  - {INA_QV}\n")
    gm = graft(build_empty(source.config, "causal_lm", dtype=DTYPE[precision]), rec, model_id=source.model_id)
    materialize(gm, source.directory, dtype=DTYPE[precision])
    return gm


# ---- 1. low-precision base ---------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", ["bf16", "fp16", "fp32"])
def test_the_base_is_held_in_bf16_from_any_checkpoint(root, checkpoint):
    gm = _grafted(root, checkpoint, "bf16")
    base = {n: p for n, p in gm.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in base.values()} == {torch.bfloat16}
    # adapters are fp32 (cast at the site); the rotary table stays fp32 as in HF's own bf16 model
    assert {p.dtype for p in gm.adapter_state_dict().values()} == {torch.float32}
    assert gm.get_buffer("model.rotary_emb.inv_freq").dtype == torch.float32
    # the values are the checkpoint's, rounded once to bf16
    stored = load_file(str(root / checkpoint / "model.safetensors"))
    for name, p in base.items():
        key = name if name in stored else "model.embed_tokens.weight"  # lm_head is tied
        assert torch.equal(p, stored[key].to(torch.bfloat16)), name
    if checkpoint == "bf16":  # used as mapped from the file, no copy
        assert base["model.layers.0.mlp.up_proj.weight"].untyped_storage().nbytes() \
            < 4 * base["model.layers.0.mlp.up_proj.weight"].numel()


def test_bf16_graph_matches_hf_bf16_model(root):
    """The bf16 graph computes what transformers' own bf16 model computes (rotary tables in fp32 included)."""
    from transformers import AutoModelForCausalLM

    gm = _grafted(root, "bf16", "bf16").eval()
    hf = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ours, theirs = gm(input_ids=ids).logits, hf(input_ids=ids).logits
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_graft_on_a_bf16_model_trains_fp32_adapters(root):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16)
    gm = graft(hf, parse_recipe(f"name: t\nrules:\n  - {INA_QV}\n")).train()
    ids = torch.randint(3, hf.config.vocab_size, (2, 12))
    gm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in gm.adapter_state_dict().items()}
    assert len(grads) == 2 * 2 * 2 and all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert all(p.grad is None for p in gm.parameters() if not p.requires_grad)


@pytest.mark.parametrize("checkpoint", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [0, 2])
def test_low_precision_checkpoints_train_and_save(root, tmp_path, capsys, checkpoint, stage):
    out = tmp_path / "run"
    log = train_here(capsys, recipe(tmp_path / "r.yaml", [INA_QV], TRAIN), "--model", str(root / checkpoint),
                     "--data", str(root / "alpaca.jsonl"), "--out", str(out), "train.precision=bf16",
                     f"train.zero_stage={stage}")
    assert f"ZeRO-{stage}, bf16" in log
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert len(saved) == 8 and {t.dtype for t in saved.values()} == {torch.float32}
    # the optimizer's fp32 master weights, not the model's bf16 copy: some value is not a bf16 number
    assert not all(torch.equal(t, t.bfloat16().float()) for t in saved.values())
    assert any(t.abs().sum() > 0 for n, t in saved.items() if n.endswith("lora_B"))


def test_apply_takes_a_dtype(root, capsys):
    path = root / "apply.yaml"
    path.write_text(f"name: a\nrules:\n  - {INA_QV}\n")
    capsys.readouterr()
    assert cli.main(["apply", str(path), "--model", str(root / "fp32"), "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    # tiny Llama: 2 layers of 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 weights, 2 * (V * 32) embeddings + final norm
    base = sum(p.numel() for n, p in _grafted(root, "fp32", "fp32").named_parameters() if "lora" not in n)
    assert f"base weights in bfloat16: {2 * base / 2**30:.2f} GiB; adapters float32" in text


# ---- 2. activation checkpointing ---------------------------------------------------------------------------

DROPOUT_RULE = ('{name: ina_qv, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, '
                'adapter: {kind: ina, rank: 4, alpha: 8, dropout: 0.3}}')


def _tiny_grafted(seed: int = 0):
    from zoo import tiny_model

    gm = graft(tiny_model("llama", seed=seed, attention_dropout=0.2),
               parse_recipe(f"name: t\nrules:\n  - {DROPOUT_RULE}\n")).train()
    with torch.no_grad():  # B away from 0, so the adapters change the output and their dropout matters
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    return gm


def _steps(gm, ids, n: int = 2):
    torch.manual_seed(1)
    losses = []
    for _ in range(n):
        loss = gm(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in gm.adapter_state_dict().items()}


def _held_for_backward(gm, ids) -> int:
    """Bytes a training forward allocates and still holds when backward starts (CPU allocator, profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = gm(input_ids=ids, labels=ids).loss
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return held


def test_checkpointing_gives_the_same_losses_and_gradients_with_dropout():
    ids = torch.randint(3, 128, (2, 24))
    reference = _steps(_tiny_grafted(), ids)
    gm = _tiny_grafted()
    gm.gradient_checkpointing_enable()
    assert gm.is_gradient_checkpointing and gm.graftr_outlined == ["model.layers.0", "model.layers.1"]
    assert sum(n.target.__name__ == "run_layer" for n in gm.graph.nodes if n.op == "call_function") == 2
    losses, grads = _steps(gm, ids)
    assert losses == reference[0]  # bit for bit: the recompute draws the same dropout masks
    assert sorted(grads) == sorted(reference[1]) and len(grads) == 8
    for name, g in grads.items():
        assert torch.equal(g, reference[1][name]), name
    # without the restored random state the recompute draws other masks and the gradients differ
    gm.gradient_checkpointing_enable({"preserve_rng_state": False})
    for p in gm.parameters():
        p.grad = None
    assert any(not torch.equal(g, reference[1][n]) for n, g in _steps(gm, ids)[1].items())


def test_checkpointing_lowers_the_memory_held_for_backward():
    ids = torch.randint(3, 128, (2, 48))
    gm = _tiny_grafted()
    plain = _held_for_backward(gm, ids)
    gm.gradient_checkpointing_enable()
    checkpointed = _held_for_backward(gm, ids)
    assert checkpointed < 0.75 * plain, (checkpointed, plain)


def test_gradient_checkpointing_disable_restores_the_flat_graph():
    gm = _tiny_grafted()
    flat = gm.code
    gm.gradient_checkpointing_enable()
    with pytest.raises(Exception, match="gradient_checkpointing_disable"):
        gm.merge_()
    gm.gradient_checkpointing_disable()
    assert not gm.is_gradient_checkpointing and gm.graftr_outlined == [] and gm.code == flat
    ids = torch.randint(3, 128, (1, 8))
    gm.eval()
    with torch.no_grad():
        before = gm(input_ids=ids).logits
    gm.gradient_checkpointing_enable()
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids).logits, before)  # eval: no recompute, same values


def test_gradient_checkpointing_kwargs_are_checked():
    from graftr.errors import GraftrError

    gm = _tiny_grafted()
    with pytest.raises(GraftrError, match="use_reentrant=True is not supported"):
        gm.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(GraftrError, match=r"\['context_fn'\] are not supported"):
        gm.gradient_checkpointing_enable({"context_fn": None})
    gm.gradient_checkpointing_enable({"use_reentrant": False})
    assert gm.is_gradient_checkpointing


CKPT_TRAIN = """
max_steps: 3
micro_batch_size: 4
lr: 0.02
lr_schedule: constant
log_every: 1
data: {format: alpaca, max_length: 64, eval_split: null}
"""


@pytest.mark.parametrize("compile", [False, True])
def test_train_with_checkpointing_equals_without(root, tmp_path, capsys, compile):
    rec = recipe(tmp_path / "r.yaml", [DROPOUT_RULE], CKPT_TRAIN)
    runs = {}
    for mode in ("none", "layers"):
        out = tmp_path / mode
        log = train_here(capsys, rec, "--model", str(root / "fp32"), "--data", str(root / "alpaca.jsonl"),
                         "--out", str(out), f"train.activation_checkpointing={mode}", f"train.compile={compile}")
        assert ("activation checkpointing: 2 layers recomputed in backward" in log) == (mode == "layers")
        assert "measured peak memory per rank (cpu)" in log
        runs[mode] = out
    assert [r["loss"] for r in records(runs["layers"])] == pytest.approx([r["loss"] for r in records(runs["none"])],
                                                                         rel=1e-6 if compile else 0)
    a, b = (load_file(str(runs[m] / "adapter" / "adapter.safetensors")) for m in ("none", "layers"))
    assert sorted(a) == sorted(b)
    # eager: bit for bit. Compiled: the graphs with and without checkpoint regions fuse differently (rounding), and
    # AdamW's normalisation magnifies rounding in near-zero gradients to a fraction of lr (0.02) per step
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-3 if compile else 0), name


@pytest.mark.slow  # two processes through the DeepSpeed launcher, twice
def test_checkpointing_under_two_process_zero3_equals_without(root, tmp_path):
    from test_train import graftr_train

    rec = recipe(tmp_path / "r.yaml", [DROPOUT_RULE], CKPT_TRAIN.replace("micro_batch_size: 4", "micro_batch_size: 2"))
    common = [rec, "--model", str(root / "bf16"), "--data", str(root / "alpaca.jsonl"), "--nproc", "2",
              "train.zero_stage=3", "train.precision=bf16"]
    logs = {m: graftr_train(*common, "--out", str(tmp_path / m), f"train.activation_checkpointing={m}", cwd=tmp_path)
            for m in ("none", "layers")}
    assert "activation checkpointing: 2 layers recomputed in backward" in logs["layers"]
    assert "outlined 2 layers: ZeRO-3 gathers one layer's parameters at a time" in logs["none"]
    assert [r["loss"] for r in records(tmp_path / "layers")] == [r["loss"] for r in records(tmp_path / "none")]
    a, b = (load_file(str(tmp_path / m / "adapter" / "adapter.safetensors")) for m in ("none", "layers"))
    assert sorted(a) == sorted(b) and len(a) == 8
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_16_bit_base_on_a_cpu_computes_its_frozen_linears_in_fp32():
    """The cpu_fp32_matmul pass: exactly the frozen linears of the layer stacks (7 per Llama layer), not the head
    (the fused loss still finds it) nor an adapter's; the loss and adapter gradients equal the 16-bit graph's."""
    from zoo import tiny_model

    from graftr.cpu_matmul import CpuMatmulPass, linear_fp32
    from graftr.passbase import run_passes

    gm = graft(tiny_model("llama", "causal_lm").to(torch.bfloat16), parse_recipe(f"name: t\nrules:\n  - {INA_QV}\n"))
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, 128, (2, 12))

    def loss_and_grads():
        torch.manual_seed(0)
        loss = gm.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in gm.adapter_state_dict().items()}
        gm.zero_grad(set_to_none=True)
        return loss.item(), grads

    before = loss_and_grads()
    run_passes(gm, CpuMatmulPass())
    assert gm.graftr_fp32_matmuls == 14
    assert sum(n.target is linear_fp32 for n in gm.graph.nodes) == 14
    assert gm._fused_head() is not None
    after = loss_and_grads()
    assert after[0] == pytest.approx(before[0], rel=1e-3)
    for name, g in after[1].items():
        torch.testing.assert_close(g, before[1][name], atol=1e-3, rtol=2e-2)


# ---- 3. the memory estimate ----------------------------------------------------------------------------------

def test_estimate_counts_from_the_config_alone(root, capsys):
    path = root / "est.yaml"
    path.write_text(f"name: e\nrules:\n  - {INA_QV}\ntrain: {{max_steps: 2, lr: 0.01, micro_batch_size: 2, "
                    "data: {format: text, max_length: 64}}\n")
    from graftr.estimate import estimate
    from graftr.recipe import load_recipe

    one = estimate(load_recipe(path, ["train.precision=bf16", "train.zero_stage=2"]), str(root / "bf16"), 1)
    three = estimate(load_recipe(path, ["train.precision=bf16", "train.zero_stage=3"]), str(root / "bf16"), 2)
    n_base, n_tr = one.counts["base"], one.counts["trainable"]
    assert n_tr == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # 2 layers, rank 4: q 32 -> 32, v 32 -> 16 (2 kv heads)
    assert one.base == 2 * n_base and three.base == n_base  # bf16, whole vs ZeRO-3 over 2 ranks
    assert three.gathered_layer > 0 == one.gathered_layer
    assert 0 < one.activations_checkpointed < one.activations
    capsys.readouterr()
    assert cli.main(["estimate", str(path), "--model", str(root / "bf16"), "--nproc", "2", "train.zero_stage=3",
                     "train.activation_checkpointing=layers"]) == 0
    assert "memory estimate per rank" in capsys.readouterr().out


@pytest.mark.slow  # a 57 M-parameter model trained twice in fresh processes (~1 minute)
def test_the_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    """graftr train prints graftr estimate's line at start and the measured peak at the end; on a model whose
    weights and activations are large beside the process's own memory the two agree within 25 %, with and without
    checkpointing. The runs return freed memory (``train.return_freed_memory=always``), so the resident peak is the
    memory in use; with glibc's defaults (what ``auto`` keeps for a run this small) freed blocks stay in the heap and
    the resident peak is up to ~1.5x the estimate here."""
    import json

    from test_train import graftr_train

    model_dir(tmp_path / "mid", "llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    rows = [{"text": " ".join(f"{i} {x} {o}" for _ in range(12))} for i, x, o in INSTRUCTIONS]
    data = write_jsonl(tmp_path / "text.jsonl", rows * 4)
    rec = recipe(tmp_path / "r.yaml", [INA_QV], "max_steps: 2\nmicro_batch_size: 4\nlr: 0.01\nlog_every: 1\n"
                 "data: {format: text, packing: true, max_length: 256, eval_split: null}")
    for mode in ("none", "layers"):
        log = graftr_train(rec, "--model", str(tmp_path / "mid"), "--data", data, "--out", str(tmp_path / mode),
                           f"train.activation_checkpointing={mode}", "train.return_freed_memory=always", cwd=tmp_path)
        assert f"with checkpointing {mode}, loss workspace" in log and "; estimated " in log
        training = json.loads((tmp_path / mode / "adapter" / "manifest.json").read_text())["training"]
        measured, estimated = training["peak_memory"][0], training["memory_estimate"]
        assert abs(estimated - measured) <= 0.25 * measured, (mode, measured / 2**30, estimated / 2**30)


def test_freed_memory_goes_back_to_the_system_only_where_memory_is_tight_or_the_model_is_large():
    """train.return_freed_memory: auto fixes glibc's mmap threshold (a page fault per 4 KiB of every large tensor,
    every step) only when the estimate of the machine's training processes exceeds half the memory available, or
    the model has 3B parameters or more."""
    from graftr.train.memory import LARGE, TIGHT, decide

    gib = 2**30
    assert TIGHT == 0.5
    assert decide("auto", 4 * gib, 2, 20 * gib) == (False, None)  # 8 of 20 GiB: the run fits either way
    apply, note = decide("auto", 6 * gib, 2, 20 * gib)  # 12 of 20 GiB
    assert apply and note.startswith("memory is tight (12.00 GiB estimated for 2 process(es), 20.00 GiB available)")
    assert decide("auto", None, 1, 20 * gib) == (False, None)  # no estimate (a model graftr cannot count)
    assert decide("auto", 6 * gib, 1, None) == (False, None)  # no reading of the free memory
    assert decide("never", 100 * gib, 1, gib) == (False, None)
    apply, note = decide("always", None, 1, None)
    assert apply and "train.return_freed_memory: always" in note
    assert LARGE == 3_000_000_000
    apply, note = decide("auto", 4 * gib, 1, 20 * gib, parameters=6_742_609_920)  # the 7B NF4 run: 4 of 20 GiB
    assert apply and note.startswith("a 6.7B-parameter model: freed activations go back")
    assert decide("auto", 2 * gib, 1, 20 * gib, parameters=134_515_008) == (False, None)  # SmolLM2
    assert decide("never", 4 * gib, 1, 20 * gib, parameters=6_742_609_920) == (False, None)
