"""The CUDA paths: run by ``tools/gpu_check.sh`` on a machine with a GPU, skipped everywhere else (CI has none).

Each test is the CUDA twin of a CPU test: the bf16 graph equals transformers' own bf16 model (test_scale), a
quantized graft equals the HF model on bitsandbytes' round-tripped weights (test_quantize), checkpointing gives
the losses of no checkpointing (test_scale), and ``graftr train`` runs on one GPU over NCCL and reports the CUDA peak.
GPU kernels may pick other reduction orders for other shapes, so the comparisons use tolerances where the CPU
twins compare bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")

INA_QV = ('{name: ina_qv, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, '
          'adapter: {kind: ina, rank: 4, alpha: 8, dropout: 0.1}}')


def _recipe(extra: str = ""):
    from graftr.recipe import parse_recipe

    return parse_recipe(f"name: gpu\nrules:\n  - {INA_QV}\n{extra}")


def test_bf16_graph_matches_hf_on_cuda():
    from zoo import tiny_model

    from graftr import graft

    hf = tiny_model("llama", "causal_lm").to("cuda", torch.bfloat16).eval()
    gm = graft(copy.deepcopy(hf), _recipe()).eval()
    ids = torch.randint(3, hf.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        ours, theirs = gm(input_ids=ids).logits, hf(input_ids=ids).logits
    assert ours.device.type == "cuda" and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_quantized_graft_equals_hf_on_round_tripped_weights_on_cuda(method):
    import bitsandbytes.functional as BF
    from zoo import tiny_model

    from graftr import graft

    model = tiny_model("llama", "causal_lm").cuda()
    reference = copy.deepcopy(model)
    gm = graft(model, _recipe(f"quantize: {{method: {method}, compute_dtype: float32}}\n")).eval()
    quantized = [s for s in gm.site_index.linear if s.quant]
    assert quantized and {s.quant for s in quantized} == {method}
    with torch.no_grad():
        for site in quantized:
            w = reference.get_parameter(site.weight)
            q, state = BF.quantize_4bit(w, blocksize=64, quant_type=method)
            w.copy_(BF.dequantize_4bit(q, state))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_checkpointing_gives_the_same_losses_on_cuda():
    from zoo import tiny_model

    from graftr import graft

    def steps(checkpointing: bool):
        gm = graft(tiny_model("llama", seed=0).cuda(), _recipe()).train()
        if checkpointing:
            gm.gradient_checkpointing_enable()
        torch.manual_seed(1)
        ids = torch.randint(3, 128, (2, 24), device="cuda")
        losses = []
        for _ in range(2):
            loss = gm(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        return losses, {n: p.grad for n, p in gm.adapter_state_dict().items()}

    (plain, g_plain), (ckpt, g_ckpt) = steps(False), steps(True)
    assert ckpt == pytest.approx(plain, rel=1e-5)
    for name, g in g_ckpt.items():
        torch.testing.assert_close(g, g_plain[name], atol=1e-5, rtol=1e-4)


def test_train_on_one_gpu(tmp_path, capsys):
    from after_training_kit import model_dir
    from test_train import INSTRUCTIONS, recipe, records, write_jsonl

    from graftr import cli

    model_dir(tmp_path / "llama", "llama")
    data = write_jsonl(tmp_path / "alpaca.jsonl",
                       [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS])
    train = ("max_steps: 3\nmicro_batch_size: 4\nlr: 0.02\nlr_schedule: constant\nwarmup_steps: 0\nlog_every: 1\n"
             "precision: bf16\nactivation_checkpointing: layers\ndata: {format: alpaca, max_length: 64, "
             "eval_split: null}\n")
    out = tmp_path / "run"
    assert cli.main(["train", recipe(tmp_path / "r.yaml", [INA_QV], train), "--model", str(tmp_path / "llama"),
                     "--data", data, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured peak memory per rank (cuda)" in text
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    manifest = json.loads((out / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["peak_memory"][0] > 0
