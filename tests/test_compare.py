"""``graftr compare``: graftr recipes and PEFT baselines trained alike (the same data, batches, schedule, loss and
evaluation), summarized per method; an interrupted comparison continues; bad comparison files are one-line errors.

Tiny 2-layer Llama (:mod:`after_training_kit`) and a two-answer instruction set written here; each run is a process
of its own (~10 s). ``tests/test_real_llm.py`` runs graftr against PEFT on the real SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from after_training_kit import cli_error, model_dir

from graftr import cli

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORDS = "fire sun snow ice oven frost desert glacier lava winter summer steam".split()
HOT = {"fire", "sun", "oven", "desert", "lava", "summer", "steam"}

IA3 = '{name: ia3, rules: [{name: kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}]}'
PROMPTS = '{name: prompts, rules: [{name: p, match: {op: attention}, adapter: {kind: gated_prompt, length: 4}}]}'


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for name in LAUNCH_VARS:  # left by single-process runs of other tests in this worker
        monkeypatch.delenv(name, raising=False)


def rows(words: list[str]) -> list[dict]:
    return [{"instruction": "Is it hot or cold?", "input": w, "output": "hot" if w in HOT else "cold",
             "choices": ["hot", "cold"]} for w in words]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir(root / "llama", "llama")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(WORDS * 2)))
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(WORDS[:6])))
    return root


def spec(root: Path, methods: list[str], name: str = "tiny", train: str = "{max_steps: 3, micro_batch_size: 4, "
         "eval_every: 2}") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {root / 'llama'}\ndata: data\nseeds: [0]\ntrain: {train}\nmethods:\n"
                    + "".join(f"  - {m}\n" for m in methods))
    return path


def test_graftr_and_peft_train_alike_and_the_comparison_is_written(setup, capsys):
    path = spec(setup, [f"{{name: graftr IA3, family: IA3, recipe: {IA3}}}",
                        "{name: PEFT IA3, family: IA3, peft: {peft_type: IA3, target_modules: [k_proj, v_proj], "
                        "feedforward_modules: []}}",
                        f"{{name: gated prompts, family: prompts, recipe: {PROMPTS}}}"])
    out = setup / "out"
    assert cli.main(["compare", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[3/3] gated prompts seed 0" in printed and "(PEFT has no counterpart)" in printed
    results = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in results["methods"]] == ["graftr IA3", "PEFT IA3", "gated prompts"]
    by_name = {r["method"]: r for r in results["runs"]}
    # the PEFT baseline trained with graftr IA3's resolved settings (lr, schedule, warmup from IA³'s defaults)
    baseline = json.loads((out / "runs" / "peft-ia3" / "seed0" / "baseline.json").read_text())
    assert baseline["train"]["lr"] == 3e-3 and baseline["train"]["seed"] == 0 and baseline["train"]["max_steps"] == 3
    # no sample answers in a comparison's runs (train.samples 0), on either side
    manifest = json.loads((out / "runs" / "graftr-ia3" / "seed0" / "run" / "adapter" / "manifest.json").read_text())
    assert baseline["train"]["samples"] == 0 and manifest["training"]["before"]["answers"] == []
    # the same method on the same batches: the same losses (graftr's fused loss vs transformers' loss)
    losses = {name: [r["loss"] for r in map(json.loads, (out / "runs" / slug / "seed0" / "run" / "metrics.jsonl")
                                             .read_text().splitlines()) if r["kind"] == "train"]
              for name, slug in (("graftr", "graftr-ia3"), ("peft", "peft-ia3"))}
    assert len(losses["graftr"]) == 3 and losses["graftr"] == pytest.approx(losses["peft"], rel=1e-4)
    assert by_name["graftr IA3"]["trainable_params"] == by_name["PEFT IA3"]["trainable_params"]
    for r in results["methods"]:
        assert r["metric"] == "accuracy" and [c[0] for c in r["curve"]] == [0, 2, 3]
    table = (out / "results.md").read_text()
    assert "| IA3 | graftr IA3 (graftr) | accuracy" in table and "| prompts | — (PEFT has no counterpart) |" in table
    assert (out / "curves.png").stat().st_size > 10_000

    # run again: every run is kept, nothing trains
    stamp = (out / "runs" / "graftr-ia3" / "seed0" / "summary.json").stat().st_mtime_ns
    assert cli.main(["compare", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("(kept from an earlier run)") == 3
    assert (out / "runs" / "graftr-ia3" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_an_interrupted_run_is_run_again(setup, capsys):
    from graftr.compare import SPEC_FILE, load

    path = spec(setup, [f"{{name: graftr IA3, family: IA3, recipe: {IA3}}}"], name="again",
                train="{max_steps: 2, micro_batch_size: 4}")
    out = setup / "again"
    stopped = out / "runs" / "graftr-ia3" / "seed0"
    stopped.mkdir(parents=True)
    (stopped / "log.txt").write_text("killed\n")  # a run stopped before its summary
    (out / SPEC_FILE).write_text(load(path)[0].model_dump_json())  # what the interrupted start recorded
    assert cli.main(["compare", str(path), "--out", str(out)]) == 0
    assert "(kept from an earlier run)" not in capsys.readouterr().out
    assert (stopped / "summary.json").is_file() and "killed" not in (stopped / "log.txt").read_text()
    other = spec(setup, [f"{{name: graftr IA3, family: IA3, recipe: {IA3}}}"], name="again",
                 train="{max_steps: 5, micro_batch_size: 4}")
    assert "holds a comparison with other settings" in cli_error(capsys, ["compare", str(other), "--out", str(out)])


def test_bad_comparisons_are_one_line_errors(setup, capsys, tmp_path):
    both = spec(tmp_path, [f"{{name: m, family: f, recipe: {IA3}, peft: {{peft_type: IA3}}}}"], name="both")
    assert "a method has either a recipe (graftr) or a peft config" in cli_error(capsys, ["compare", str(both)])
    alone = spec(tmp_path, ["{name: p, family: prefix, peft: {peft_type: PREFIX_TUNING, num_virtual_tokens: 4}}"],
                 name="alone")
    assert "has no graftr method to take the train settings from; set train: {lr: ...}" in \
        cli_error(capsys, ["compare", str(alone)])
    twice = spec(tmp_path, [f"{{name: m, family: f, recipe: {IA3}}}", f"{{name: m, family: f, recipe: {IA3}}}"],
                 name="twice")
    assert "method names must differ: m" in cli_error(capsys, ["compare", str(twice)])
    good = spec(setup, [f"{{name: graftr IA3, family: IA3, recipe: {IA3}}}"], name="good")
    assert "--only: no method named 'nope'" in cli_error(capsys, ["compare", str(good), "--only", "nope"])
    assert "graftr compare takes train.KEY=VALUE overrides" in \
        cli_error(capsys, ["compare", str(good), "rules.0.name=x"])
    assert "graftr compare takes train.KEY=VALUE overrides" in \
        cli_error(capsys, ["compare", str(good), "--only", "graftr IA3", "rules.0.name=x"])  # after an option too
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds files that are not a graftr comparison" in \
        cli_error(capsys, ["compare", str(good), "--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_peft_baseline_gets_the_graftr_methods_head(tmp_path, capsys):
    """On an encoder whose own task is masked LM, the graftr recipe trains a new two-class classifier; the PEFT
    baseline of the comparison is built for the same task and label count (it was refused as 'masked_lm')."""
    model_dir(tmp_path / "bert", "bert")
    data = tmp_path / "data"
    data.mkdir()
    for split, words in (("train", WORDS * 2), ("validation", WORDS[:6])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": w, "label": int(w in HOT)}) + "\n"
                                                     for w in words))
    ia3 = ('{name: ia3, task: seq_cls, trainable_modules: [classifier], rules: [{name: kv, match: {path: '
           '"bert.encoder.layer.*.attention.self.{key,value}"}, adapter: {kind: ia3}}]}')
    path = tmp_path / "cls.yaml"
    path.write_text(f"name: cls\nmodel: {tmp_path / 'bert'}\ndata: data\nseeds: [0]\n"
                    "train: {max_steps: 2, micro_batch_size: 4, data: {format: classification}}\nmethods:\n"
                    f"  - {{name: graftr IA3, family: IA3, recipe: {ia3}}}\n"
                    "  - {name: PEFT IA3, family: IA3, peft: {peft_type: IA3, target_modules: [key, value], "
                    "feedforward_modules: []}}\n"
                    "  - {name: PEFT LoRA, family: LoRA, peft: {peft_type: LORA, r: 2, target_modules: [query]}, "
                    "train: {lr: 0.001}}\n")
    out = tmp_path / "out"
    assert cli.main(["compare", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    for slug in ("peft-ia3", "peft-lora"):  # the family's graftr method, and the first one for a family without
        baseline = json.loads((out / "runs" / slug / "seed0" / "baseline.json").read_text())
        assert baseline["task"] == "seq_cls" and baseline.get("num_labels", 2) == 2  # else: the data's labels
    results = json.loads((out / "results.json").read_text())
    assert all("accuracy" in run["evals"][-1] for run in results["runs"])
