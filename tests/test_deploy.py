"""graftr deploy: programs that run with torch alone equal the grafted model, for every adapter kind.

Each artifact is written by the CLI, then read in a subprocess in which importing graftr, transformers or PEFT
fails: its logits, its greedy tokens (KV cache) and its decode steps (against recomputing the whole sequence) are
compared here with the grafted model and with ``graft generate``'s token loop.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from after_training_kit import cli_error, model_dir, randomize, tokenizer

from graftr import cli, graft, save_adapter
from graftr.generate import generate_ids, generate_text, positions
from graftr.load import load_adapters
from graftr.recipe import parse_recipe

RULE = "name: t\nrules:\n  - name: a\n    match: {match}\n    adapter: {adapter}\n"
ATTENTION = "{op: attention}"
KINDS = {  # every adapter kind, mergeable or not
    "ia3": RULE.format(match="{op: linear, layers: {last: 2}}", adapter="{kind: ia3}"),
    "ina": RULE.format(match='{path: "model.layers.*.self_attn.{q_proj,v_proj}"}',
                       adapter="{kind: ina, rank: 4, inhibition: 0.3}"),
    "scale_bias": RULE.format(match="{op: linear, layers: {last: 1}}", adapter="{kind: scale_bias}"),
    "gated_prompt": RULE.format(match=ATTENTION, adapter="{kind: gated_prompt, length: 3}"),
    "gated_adapt_gate": RULE.format(match=ATTENTION, adapter="{kind: gated_prompt, length: 3, gate: adapt}"),
    "hypernetwork": RULE.format(match=ATTENTION, adapter="{kind: gated_prompt, length: 3, prompt: hypernetwork}"),
    "prefix": RULE.format(match=ATTENTION, adapter="{kind: gated_prompt, length: 3, mode: prefix}"),
}
BANKS = {"ina": 3, "hypernetwork": 2}  # kinds deployed as a bank of N adapters
MAX_NEW = 6

# The start of every reader script: a fresh interpreter in which importing graftr, transformers or PEFT fails.
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("graftr", "transformers", "peft"):
                raise ImportError(f"{name} must not be needed to run a deployment")
    sys.meta_path.insert(0, Block())
""")

# Reads every artifact of the fixture below; writes what it computed.
READER = BLOCK + textwrap.dedent("""
    import json
    import torch
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for job in jobs:
        sys.path.insert(0, job["dir"])
        import graftr_runtime
        model = graftr_runtime.load(job["dir"], verify=True)
        ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
        index = torch.tensor(job["index"]) if job["index"] is not None else None
        result = {"logits": model.logits(ids, adapter_index=index)}
        if model.cache is not None:
            result["tokens"] = model.generate(ids, mask, max_new_tokens=job["new"], adapter_index=index)
            # decode one token at a time after a prompt; each step against model.pt2 on the whole sequence
            seq, worst = ids[:, :3], 0.0
            logits, cache = model.step(seq, torch.ones_like(seq), adapter_index=index)
            for t in range(3, ids.shape[1]):
                logits, cache = model.step(ids[:, t:t + 1], torch.ones_like(ids[:, :1]), cache, adapter_index=index)
                full = model.logits(ids[:, :t + 1], adapter_index=index)[:, -1]
                worst = max(worst, float((logits[:, -1] - full).abs().max()))
            result["decode_vs_full"] = worst
            result["padded_prompt_logits"] = model.step(ids, mask, adapter_index=index)[0]
        out[job["name"]] = result
        del sys.modules["graftr_runtime"]
        sys.path.pop(0)
    torch.save(out, sys.argv[2])
""")


def _inputs(vocab: int, batch: int = 3):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1000, vocab, (batch, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded rows
    mask[2, :5] = 0
    return ids, mask


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Every kind deployed alone and the kinds of BANKS as banks; the subprocess's results for all of them."""
    root = tmp_path_factory.mktemp("deploy")
    model = model_dir(root / "base", "llama")
    vocab = model.config.vocab_size
    ids, mask = _inputs(vocab)
    jobs, cases = [], {}
    for kind, recipe in KINDS.items():
        count = BANKS.get(kind, 1)
        names = []
        for i in range(count):
            gm = randomize(graft(model, parse_recipe(recipe), model_id=str(root / "base")), seed=i)
            save_adapter(gm, root / f"{kind}{i}")
            names.append(str(root / f"{kind}{i}"))
        out = root / f"{kind}-deployed"
        assert cli.main(["deploy", *names, "--model", str(root / "base"), "--out", str(out), "--max-batch", "4",
                         "--max-length", "32"]) == 0
        index = [i % count for i in range(ids.shape[0])] if count > 1 else None
        jobs.append({"name": kind, "dir": str(out), "ids": ids.tolist(), "mask": mask.tolist(), "index": index,
                     "new": MAX_NEW})
        cases[kind] = names
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "reader.py").write_text(READER)
    run = subprocess.run([sys.executable, str(root / "reader.py"), str(root / "jobs.json"), str(root / "out.pt")],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, cases, torch.load(root / "out.pt"), (ids, mask)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_exported_program_equals_the_grafted_model_without_graftr(deployed, kind):
    root, cases, results, (ids, mask) = deployed
    loaded, names = load_adapters(str(root / "base"), cases[kind])
    gm, got = loaded.gm, results[kind]
    tok = tokenizer()
    index = torch.tensor([i % len(cases[kind]) for i in range(ids.shape[0])])
    for j, adapter in enumerate(cases[kind]):
        gm.set_adapter(names[adapter], inference_mode=True)
        rows = index == j
        with torch.no_grad():
            want = gm(input_ids=ids).logits
            padded = gm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert (got["logits"][rows] - want[rows]).abs().max() <= 1e-5
        assert (got["padded_prompt_logits"] - padded)[rows][mask[rows].bool()].abs().max() <= 1e-5
        tokens = generate_ids(gm, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=[tok.eos_token_id],
                              pad_token_id=tok.pad_token_id).tokens
        assert torch.equal(got["tokens"][rows][:, :tokens.shape[1]], tokens[rows])
    assert got["decode_vs_full"] <= 1e-5
    if len(cases[kind]) > 1:  # the bank's rows really differ by adapter
        gm.set_adapter(names[cases[kind][0]], inference_mode=True)
        first = gm(input_ids=ids).logits
        assert (got["logits"][index != 0] - first[index != 0]).abs().max() > 1e-3


ALPACA = KINDS["gated_prompt"] + "train: {lr: 1.0e-3, max_steps: 1, data: {format: alpaca}}\n"


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    root = tmp_path_factory.mktemp("alpaca")
    model = model_dir(root / "base", "llama")
    gm = randomize(graft(model, parse_recipe(ALPACA), model_id=str(root / "base")), seed=3)
    save_adapter(gm, root / "adapter")
    assert cli.main(["deploy", str(root / "adapter"), "--out", str(root / "dep"), "--max-length", "48"]) == 0
    return root, gm


def test_the_runtime_answers_text_prompts_as_graftr_generate(alpaca):
    root, gm = alpaca
    prompts = ["Name a colour.", "Write one word about the sea and the sky."]
    manifest = json.loads((root / "dep" / "deploy.json").read_text())
    assert manifest["template"]["before"].startswith("Below is an instruction")
    expected, _ = generate_text(gm, tokenizer(), prompts, max_new_tokens=8, recipe=gm.recipe)
    run = subprocess.run([sys.executable, str(root / "dep" / "graftr_runtime.py"), str(root / "dep"), "--prompt",
                          prompts[0], "--prompt", prompts[1], "--max-new-tokens", "8"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == expected and all(expected)


def test_a_damaged_artifact_is_a_clear_error(alpaca, tmp_path):
    root, _ = alpaca
    sys.path.insert(0, str(root / "dep"))
    try:
        import graftr_runtime as rt
    finally:
        sys.path.pop(0)

    def broken(change):
        target = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root / "dep", target)
        change(target)
        return target

    def flip(path: Path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    cases = [
        (lambda d: (d / "model.pt2").write_bytes((d / "model.pt2").read_bytes()[:1000]), {}, "model.pt2 has 1,000 bytes"),
        (lambda d: (d / "decode.pt2").unlink(), {}, "decode.pt2 is missing"),
        (lambda d: flip(d / "model.pt2"), {"verify": True}, "does not match its SHA-256"),
        (lambda d: (d / "deploy.json").write_text("{"), {}, "not JSON"),
        (lambda d: (d / "deploy.json").unlink(), {}, "no deploy.json"),
    ]
    for change, options, message in cases:
        with pytest.raises(rt.DeployError, match=message):
            rt.load(broken(change), **options)
    # a file rewritten with the same size is caught by torch's reader when not verified
    target = broken(lambda d: (d / "prefill.pt2").write_bytes(b"\0" * (d / "prefill.pt2").stat().st_size))
    with pytest.raises(rt.DeployError, match="prefill.pt2 cannot be loaded"):
        rt.load(target)
    # the runtime's command line: one line, status 2
    run = subprocess.run([sys.executable, str(root / "dep" / "graftr_runtime.py"), str(tmp_path / "nope"),
                          "--prompt", "hi"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no deploy.json" in run.stderr
    # limits
    model = rt.load(root / "dep")
    with pytest.raises(rt.DeployError, match="at most 48"):
        model.generate(torch.ones(1, 40, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(rt.DeployError, match="adapter_index is for artifacts of several"):
        model.logits(torch.ones(1, 4, dtype=torch.long), adapter_index=[0])


def test_deploy_refusals(alpaca, tmp_path, capsys):
    root, _ = alpaca
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not a graftr output directory" in cli_error(
        capsys, ["deploy", str(root / "adapter"), "--out", str(tmp_path / "other")])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert "pass --force" in cli_error(capsys, ["deploy", str(root / "adapter"), "--out", str(root / "dep")])
    assert "--max-length 4096: the model allows 64" in cli_error(
        capsys, ["deploy", str(root / "adapter"), "--out", str(tmp_path / "x"), "--max-length", "4096"])
    assert not (tmp_path / "x").exists()
    # adapters of different structures cannot share a batch
    other = randomize(graft(model_dir(tmp_path / "b2", "llama"), parse_recipe(KINDS["ia3"]),
                             model_id=str(root / "base")), seed=1)
    save_adapter(other, tmp_path / "ia3")
    assert "cannot share a batch" in cli_error(
        capsys, ["deploy", str(root / "adapter"), str(tmp_path / "ia3"), "--out", str(tmp_path / "y")])
    # a quantized base needs bitsandbytes' kernels
    quantized = graft(model_dir(tmp_path / "b3", "llama"),
                      parse_recipe(KINDS["ia3"] + "quantize: {method: nf4}\n"), model_id=str(root / "base"))
    save_adapter(quantized, tmp_path / "nf4")
    assert "the base is quantized" in cli_error(capsys, ["deploy", str(tmp_path / "nf4"), "--model",
                                                         str(root / "base"), "--out", str(tmp_path / "z")])


def test_a_mergeable_adapter_is_merged_on_request(tmp_path, capsys):
    model = model_dir(tmp_path / "base", "llama")
    gm = randomize(graft(model, parse_recipe(KINDS["ia3"]), model_id=str(tmp_path / "base")), seed=0)
    save_adapter(gm, tmp_path / "adapter")
    assert cli.main(["deploy", str(tmp_path / "adapter"), "--out", str(tmp_path / "dep"), "--merge"]) == 0
    out = capsys.readouterr().out
    assert "plain HF model" in out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dep" / "merged").eval()
    ids = torch.randint(1000, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - gm(input_ids=ids).logits).abs().max() <= 1e-4
    # not mergeable: the artifact is written, --merge refused with the reason
    prompts = randomize(graft(model, parse_recipe(KINDS["gated_prompt"]), model_id=str(tmp_path / "base")), 1)
    save_adapter(prompts, tmp_path / "gp")
    assert "do not merge" in cli_error(capsys, ["deploy", str(tmp_path / "gp"), "--out", str(tmp_path / "dep2"),
                                                "--merge"])
    assert (tmp_path / "dep2" / "model.pt2").is_file()


def test_a_model_without_kv_cache_gets_the_logits_program(tmp_path, capsys):
    model = model_dir(tmp_path / "base", "bert", "seq_cls", num_labels=3)
    recipe = "task: seq_cls\nnum_labels: 3\ntrainable_modules: [classifier]\n" + RULE.format(
        match="{op: linear, layers: {last: 1}}", adapter="{kind: ia3}")
    gm = randomize(graft(model, parse_recipe(recipe), model_id=str(tmp_path / "base")), seed=0)
    save_adapter(gm, tmp_path / "adapter")
    assert cli.main(["deploy", str(tmp_path / "adapter"), "--out", str(tmp_path / "dep")]) == 0
    assert "no step program" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "dep" / "model.pt2")).module()
    ids = torch.randint(1000, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert (program(ids) - gm(input_ids=ids).logits).abs().max() <= 1e-5
    assert not (tmp_path / "dep" / "prefill.pt2").exists()


SWAP_READER = BLOCK + textwrap.dedent("""
    import torch
    sys.path.insert(0, sys.argv[1])
    import graftr_runtime
    ids, mask, other = torch.load(sys.argv[2])
    eager = graftr_runtime.load(sys.argv[1])
    compiled = graftr_runtime.load(sys.argv[1], compiled=True)
    out = {"eager": eager.generate(ids, mask, max_new_tokens=6), "compiled": compiled.generate(ids, mask, max_new_tokens=6),
           "eager_logits": eager.step(ids, mask)[0], "compiled_logits": compiled.step(ids, mask)[0]}
    compiled.replace(other)  # the second adapter's tensors: no recompilation
    eager.replace(other)
    out["swapped"] = compiled.generate(ids, mask, max_new_tokens=6)
    out["swapped_logits"] = compiled.step(ids, mask)[0]
    out["swapped_model_logits"] = eager.logits(ids)
    torch.save(out, sys.argv[3])
""")


def test_compiled_steps_equal_the_eager_ones_and_swap_adapters_without_recompiling(tmp_path):
    model = model_dir(tmp_path / "base", "llama")
    recipe = parse_recipe(KINDS["ina"])
    first = randomize(graft(model, recipe, model_id=str(tmp_path / "base")), seed=0)
    second = randomize(graft(model, recipe, model_id=str(tmp_path / "base")), seed=1)
    save_adapter(first, tmp_path / "first")
    assert cli.main(["deploy", str(tmp_path / "first"), "--out", str(tmp_path / "dep"), "--max-batch", "4",
                     "--max-length", "32", "--compile"]) == 0
    ids, mask = _inputs(model.config.vocab_size)
    torch.save((ids, mask, second.adapter_state_dict()), tmp_path / "in.pt")
    (tmp_path / "reader.py").write_text(SWAP_READER)
    run = subprocess.run([sys.executable, str(tmp_path / "reader.py"), str(tmp_path / "dep"), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    tok = tokenizer()
    keep = mask.bool()
    assert (got["compiled_logits"] - got["eager_logits"])[keep].abs().max() <= 1e-5
    for gm, tokens, logits in ((first, got["compiled"], got["compiled_logits"]),
                               (second, got["swapped"], got["swapped_logits"])):
        want = generate_ids(gm, ids, mask, max_new_tokens=6, eos_token_ids=[tok.eos_token_id],
                            pad_token_id=tok.pad_token_id).tokens
        assert torch.equal(tokens[:, :want.shape[1]], want)
        with torch.no_grad():
            reference = gm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert (logits - reference)[keep].abs().max() <= 1e-5
    with torch.no_grad():
        assert (got["swapped_model_logits"] - second(input_ids=ids).logits).abs().max() <= 1e-5
    assert torch.equal(got["compiled"], got["eager"])


VISION_READER = BLOCK + textwrap.dedent("""
    import torch
    sys.path.insert(0, sys.argv[1])
    import graftr_runtime
    ids, mask, pixels = torch.load(sys.argv[2])
    model = graftr_runtime.load(sys.argv[1])
    try:
        model.logits(ids)
        missing = None
    except graftr_runtime.DeployError as e:
        missing = str(e)
    torch.save({"logits": model.logits(ids, pixel_values=pixels), "missing": missing,
                "tokens": model.generate(ids, mask, max_new_tokens=6, pixel_values=pixels)}, sys.argv[3])
""")


def test_image_conditioned_prompts_deploy_with_their_image_input(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip")
    recipe = parse_recipe(f"""
name: t
vision: {{encoder: {tmp_path / 'clip'}, features: {{layers: [1, 2], pool: cls}}, hidden: 8}}
rules:
  - name: gp
    match: {{op: attention}}
    adapter: {{kind: gated_prompt, length: 3, condition: image}}
""")
    model = model_dir(tmp_path / "base", "llama")
    gm = randomize(graft(model, recipe, model_id=str(tmp_path / "base")), seed=0)
    save_adapter(gm, tmp_path / "adapter")
    assert cli.main(["deploy", str(tmp_path / "adapter"), "--out", str(tmp_path / "dep"), "--max-batch", "4",
                     "--max-length", "32"]) == 0
    ids, mask = _inputs(model.config.vocab_size)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save((ids, mask, pixels), tmp_path / "in.pt")
    (tmp_path / "reader.py").write_text(VISION_READER)
    run = subprocess.run([sys.executable, str(tmp_path / "reader.py"), str(tmp_path / "dep"), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert "pass pixel_values" in got["missing"]
    with torch.no_grad():
        assert (got["logits"] - gm(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-5
        other = gm(input_ids=ids, pixel_values=pixels.flip(0)).logits  # the image matters
        assert (got["logits"] - other).abs().max() > 1e-4
    tok = tokenizer()
    want = generate_ids(gm, ids, mask, max_new_tokens=6, eos_token_ids=[tok.eos_token_id],
                        pad_token_id=tok.pad_token_id, pixel_values=pixels).tokens
    assert torch.equal(got["tokens"][:, :want.shape[1]], want)
