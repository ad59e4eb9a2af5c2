"""lm-evaluation-harness on a grafted model: HFLM takes it as it is (log-likelihoods equal the base's at identity
init and the merged model's), and ``graftr eval --tasks`` runs a local multiple-choice task offline for any adapter
kind, the base alone included, printing the harness's table and writing its results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize_and_save, tokenizer

from graftr import cli, graft
from graftr.recipe import parse_recipe

ROOT = Path(__file__).parent.parent  # tests/data/harness/tiny_mc.yaml reads its data relative to the repository root
HARNESS = "tests/data/harness"  # tiny_mc.yaml + tiny_mc.jsonl: 12 questions, 3 choices each
IA3 = """
name: ia3_kv
rules:
  - {name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
  - {name: ia3_ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3}}
"""
GATED = """
name: llama_adapter
rules:
  - name: llama_adapter
    match: {op: attention, layers: {last: 1}}
    adapter: {kind: gated_prompt, length: 4, prompt: linear, gate: per_head_tanh}
"""
REQUESTS = [("Question: What colour is the sky?\nAnswer:", " blue"), ("Question: What colour is the sky?\nAnswer:",
            " green"), ("the cat sat on the", " mat"), ("a dog ran in the park and then", " it slept all day long")]


def loglikelihoods(model, tok) -> torch.Tensor:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(REQUESTS)]
    return torch.tensor([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)], dtype=torch.float64)


def test_hflm_loglikelihoods_equal_the_base_at_identity_and_the_merged_model(tmp_path):
    tok = tokenizer()
    model = model_dir(tmp_path / "base", "llama")
    base = loglikelihoods(model, tok)
    gm = graft(model, parse_recipe(IA3))  # IA³ vectors are ones at init: the grafted model is the base
    torch.testing.assert_close(loglikelihoods(gm, tok), base, atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    adapted = loglikelihoods(gm, tok)
    assert (adapted - base).abs().max() > 1e-2
    gm.merge_()  # folds the adapters into the parameters the HF model shares with the graph
    torch.testing.assert_close(loglikelihoods(model, tok), adapted, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A base directory and two trained-looking adapters on it: IA³ (mergeable) and gated prompts (not)."""
    root = tmp_path_factory.mktemp("harness")
    model = model_dir(root / "base", "llama")
    randomize_and_save(graft(model, parse_recipe(IA3)), root / "ia3")
    model = model_dir(root / "base2", "llama")
    gm = graft(model, parse_recipe(GATED))
    randomize_and_save(gm, root / "gated")
    return root


def run_eval(capsys, monkeypatch, argv):
    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the working directory
    capsys.readouterr()
    assert cli.main(["eval", "--tasks", "tiny_mc", "--include-path", HARNESS, *argv]) == 0
    return capsys.readouterr().out


def test_eval_tasks_on_an_adapter_prints_the_table_and_writes_json_next_to_it(adapters, capsys, monkeypatch):
    out = run_eval(capsys, monkeypatch, ["--adapter", str(adapters / "ia3"), "--limit", "6", "--num-fewshot", "1",
                                         "--batch-size", "4"])
    assert "|tiny_mc|" in out.replace(" ", "") and "acc" in out and "acc_norm" in out
    saved = json.loads((adapters / "ia3.lm_eval.json").read_text())
    assert saved["graftr"]["adapter"] == str(adapters / "ia3") and saved["n-shot"]["tiny_mc"] == 1
    acc = saved["results"]["tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and acc * 6 == round(acc * 6)  # 6 documents scored


def test_eval_tasks_on_gated_prompts_evaluates_without_merging(adapters, capsys, monkeypatch, tmp_path):
    assert "cannot be merged" in cli_error(capsys, ["merge", str(adapters / "gated"), "--out", str(tmp_path / "m")])
    out = run_eval(capsys, monkeypatch, ["--adapter", str(adapters / "gated"), "--limit", "4",
                                         "--out", str(tmp_path / "gated.json")])
    assert "acc" in out
    assert json.loads((tmp_path / "gated.json").read_text())["results"]["tiny_mc"]["alias"] == "tiny_mc"


def test_eval_tasks_on_the_base_alone(adapters, capsys, monkeypatch, tmp_path):
    out = run_eval(capsys, monkeypatch, ["--model", str(adapters / "base"), "--limit", "4",
                                         "--out", str(tmp_path / "base.json")])
    assert "acc" in out
    saved = json.loads((tmp_path / "base.json").read_text())
    assert saved["graftr"]["adapter"] is None and "acc,none" in saved["results"]["tiny_mc"]


def test_eval_tasks_on_several_adapters_evaluates_each_alone(adapters, capsys, monkeypatch, tmp_path):
    """Several --adapter: one base, each adapter evaluated in turn (graftr.named), its table under its path and its
    results beside it, equal to the adapter's own run."""
    base = ["--model", str(adapters / "base"), "--limit", "4"]
    alone = {}
    for name in ("ia3", "gated"):
        run_eval(capsys, monkeypatch, [*base, "--adapter", str(adapters / name), "--out", str(tmp_path / name)])
        alone[name] = json.loads((tmp_path / name).read_text())["results"]
    out = run_eval(capsys, monkeypatch, [*base, "--adapter", str(adapters / "ia3"), "--adapter", str(adapters / "gated")])
    for name in ("ia3", "gated"):
        assert f"=== {adapters / name}" in out
        assert json.loads((adapters / f"{name}.lm_eval.json").read_text())["results"] == alone[name]
    assert "--out names one results file" in cli_error(capsys, ["eval", "--tasks", "tiny_mc", *base, "--adapter",
                                                                str(adapters / "ia3"), "--adapter",
                                                                str(adapters / "gated"), "--out", "x.json"])


def test_eval_tasks_errors_are_one_line(adapters, capsys, monkeypatch, tmp_path):
    """A hub dataset missing from the offline cache is reported before any weight is read; misused flags too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "missing.yaml").write_text(
        "task: missing_hub\ndataset_path: graftr-test/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    base = str(adapters / "base")
    line = cli_error(capsys, ["eval", "--model", base, "--tasks", "missing_hub", "--include-path",
                              str(tmp_path / "tasks")])
    assert "cannot load the data of task(s) missing_hub" in line and "local datasets cache" in line
    assert "cannot be combined with --tasks" in cli_error(capsys, ["eval", "--model", base, "--tasks", "x",
                                                                   "--data", "d.jsonl"])
    assert "apply to --tasks" in cli_error(capsys, ["eval", "--adapter", base, "--data", "d.jsonl", "--limit", "3"])
    assert "pass --data" in cli_error(capsys, ["eval", "--model", base])
    assert "not a directory" in cli_error(capsys, ["eval", "--model", base, "--tasks", "x", "--include-path",
                                                   str(tmp_path / "nowhere")])
