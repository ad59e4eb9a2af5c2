"""The first hour of a new user: every shipped recipe trains from ``--model --data`` alone (data format inferred
from the columns, learning rate and schedule from the adapter kind's paper), a layer count written for a deeper
model is an error naming the rule, its line and the relative form; runs draw ``loss.png`` (evaluated from step 0)
and ``graftr plot`` compares runs; a run's stderr holds nothing graftr did not write.

Single-process runs call the CLI in this process (as tests/test_train.py does) on tiny models of each recipe's
family (tests/after_training_kit.py: a real WordPiece tokenizer), two steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from after_training_kit import cli_error, model_dir
from test_recipes_shipped import EXPECTED, LAYERS, RECIPES

from typing import Literal

from graftr import cli
from graftr.data import DataConfig, infer_format
from graftr.registry import AdapterConfig
from graftr.errors import GraftrError
from graftr.recipe import load_recipe
from graftr.selectors import LayerSelect

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
# data for each task, as a user has it: the repository's own sets
DATA = {"causal_lm": REPO / "data" / "alpaca_tiny.jsonl", "seq2seq_lm": REPO / "data" / "alpaca_tiny.jsonl",
        "seq_cls": REPO / "data" / "sst2_tiny"}
# the learning rate each kind's paper or official code gives (gated prompts: 9e-3 × global batch 8 / 256)
DEFAULT_LR = {"ia3": 3e-3, "ina": 5e-4, "gated_prompt": 9e-3 * 8 / 256}


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process runs set the launch variables; later tests of the session must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def family(name: str) -> tuple[str, dict]:
    """The architecture a shipped recipe is first pinned on (tests/test_recipes_shipped.py) and its depth."""
    return next(iter(EXPECTED[name])), ({"num_hidden_layers": LAYERS[name]} if name in LAYERS else {})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model directory per (architecture, task, depth) the shipped recipes need."""
    root, made = tmp_path_factory.mktemp("models"), {}

    def get(name: str) -> Path:
        recipe = load_recipe(RECIPES / name)
        arch, depth = family(name)
        key = (arch, recipe.task, tuple(depth.items()))
        if key not in made:
            path = root / "-".join(map(str, [arch, recipe.task, *depth.values()]))
            extra = {"num_labels": recipe.num_labels} if recipe.num_labels else {}
            model_dir(path, arch, recipe.task, **extra, **depth)
            made[key] = path
        return made[key]
    return get


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """``graftr train RECIPE --model M --data D train.max_steps=2`` for every shipped recipe: (exit code, stdout)."""
    out, done = tmp_path_factory.mktemp("runs"), {}

    def run(name: str, capsys) -> tuple[Path, str]:
        if name not in done:
            task = load_recipe(RECIPES / name).task or ("seq2seq_lm" if family(name)[0] == "t5" else "causal_lm")
            capsys.readouterr()
            code = cli.main(["train", str(RECIPES / name), "--model", str(models(name)), "--data", str(DATA[task]),
                             "--out", str(out / Path(name).stem), "train.max_steps=2"])
            output = capsys.readouterr()
            assert code == 0, output.err
            done[name] = (out / Path(name).stem, output.out)
        return done[name]
    return run


SHIPPED = [pytest.param(name, marks=pytest.mark.skip(reason="needs a vision encoder with weights (openai/clip-vit-large-patch14); the image path trains in tests/test_multimodal.py")) if name == "llama_adapter_multimodal.yaml" else name
           for name in sorted(p.name for p in RECIPES.glob("*.yaml"))]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_trains_from_model_and_data(runs, name, capsys):
    run, text = runs(name, capsys)
    recipe = load_recipe(RECIPES / name)
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trained if r["kind"] == "train"] == [2]
    saved = yaml.safe_load((run / "adapter" / "recipe.yaml").read_text())
    expected_format = {"seq_cls": "classification"}.get(recipe.task, "alpaca")
    assert saved["train"]["data"]["format"] == expected_format  # inferred, recorded for eval/generate
    if recipe.train is None or recipe.train.data.format is None:
        assert f"data format {expected_format} (inferred from the columns" in text
    if recipe.train is None or "lr" not in recipe.train.model_fields_set:
        # one kind gives the defaults (LLaMA-Adapter V2's scale_bias has none and trains with the prompts')
        (kind,) = {rule.adapter.kind for rule in recipe.rules} & set(DEFAULT_LR)
        assert saved["train"]["lr"] == pytest.approx(DEFAULT_LR[kind])
        start = next(line for line in text.splitlines() if line.startswith("training "))
        assert f"lr {DEFAULT_LR[kind]:g}" in start and f"({kind} defaults" in start
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_classification_run_evaluates_from_step_0_and_plots(runs, capsys):
    run, text = runs("minilm_sst2_ia3.yaml", capsys)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all("accuracy" in r for r in evals)
    assert "eval  step     0" in text
    other, _ = runs("ia3_encoder.yaml", capsys)
    capsys.readouterr()
    assert cli.main(["plot", str(run), str(other), "--out", str(run.parent / "both.png")]) == 0
    assert (run.parent / "both.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {run.parent / 'both.png'}" in capsys.readouterr().out
    assert "a graftr run directory" in cli_error(capsys, ["plot", str(run / "adapter")])


# ---- data format inference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns,task,expected", [
    (["text"], "causal_lm", {"format": "text"}),
    (["instruction", "input", "output"], "causal_lm", {"format": "alpaca"}),
    (["instruction", "output"], "seq2seq_lm", {"format": "alpaca"}),
    (["messages"], "causal_lm", {"format": "chat"}),
    (["text", "label"], "seq_cls", {"format": "classification", "text_column": "text"}),
    (["sentence", "label", "idx"], "seq_cls", {"format": "classification", "text_column": "sentence"}),
    (["premise", "hypothesis", "label"], "seq_cls",
     {"format": "classification", "text_column": "premise", "text_pair_column": "hypothesis"}),
    (["text", "label"], "causal_lm", {"format": "text"}),  # a causal LM cannot train a classifier: text
])
def test_the_format_is_inferred_from_the_columns(columns, task, expected):
    cfg, note = infer_format(columns, DataConfig(), task, "data.jsonl")
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert note.startswith(f"data format {expected['format']} (inferred from the columns")


def test_a_named_format_is_kept():
    cfg = DataConfig(format="text", text_column="body")
    assert infer_format(["body", "messages"], cfg, "causal_lm", "d") == (cfg, None)


def test_ambiguous_and_unknown_columns_are_errors():
    with pytest.raises(GraftrError, match=r"fit more than one data format: chat \(messages\), text \(text\); "
                                          r"set train.data.format to one of chat, text"):
        infer_format(["messages", "text"], DataConfig(), "causal_lm", "d")
    with pytest.raises(GraftrError, match=r"cannot tell the data format of d from its columns \(prompt, answer\): "
                                          r"for task causal_lm expect 'instruction' and 'output' \(alpaca\)"):
        infer_format(["prompt", "answer"], DataConfig(), "causal_lm", "d")
    with pytest.raises(GraftrError, match=r"they fit chat, which task seq_cls cannot train"):
        infer_format(["messages"], DataConfig(), "seq_cls", "d")


# ---- layer ranges ---------------------------------------------------------------------------------------------

def test_a_fixed_layer_count_on_a_shallower_model_names_the_rule_its_line_and_the_relative_form(tmp_path, capsys):
    model_dir(tmp_path / "llama", "llama")  # 2 layers; the recipe's last: 30 is Llama-2-7B's 30 of 32
    line = next(i for i, text in enumerate((RECIPES / "llama_adapter.yaml").read_text().splitlines(), 1)
                if "layers:" in text)
    message = cli_error(capsys, ["apply", str(RECIPES / "llama_adapter.yaml"), "--model", str(tmp_path / "llama")])
    assert message == (f"error: {RECIPES / 'llama_adapter.yaml'}:{line}: rule 'llama_adapter': cannot select layers "
                       "of 'model.layers': last 30 but the stack has only 2 layers; write layers: {last_fraction: "
                       "0.9375} to take the same share (30 of the 32 layers of meta-llama/Llama-2-7b-hf, the "
                       "recipe's model) on any depth")


def test_last_fraction_takes_the_same_share_of_any_depth():
    select = LayerSelect(last_fraction=0.9375)
    assert select.resolve(32) == set(range(2, 32))
    assert select.resolve(2) == {0, 1} and LayerSelect(last_fraction=0.1).resolve(2) == {1}  # at least one
    assert select.describe() == "last_fraction 0.9375"


# ---- quiet runs -----------------------------------------------------------------------------------------------

def graftr(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run([sys.executable, "-m", "graftr.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)


@pytest.mark.parametrize("nproc", [None, pytest.param(2, marks=pytest.mark.slow)])
def test_a_run_writes_nothing_to_stderr(models, tmp_path, nproc):
    """Every line a successful run prints is graftr's own (stdout); the libraries' warnings and bars are gone."""
    extra = ["--nproc", str(nproc), "train.micro_batch_size=4"] if nproc else []
    done = graftr("train", str(RECIPES / "minilm_sst2_ia3.yaml"), "--model", str(models("minilm_sst2_ia3.yaml")),
                  "--data", str(DATA["seq_cls"]), "--out", str(tmp_path / "run"), "train.max_steps=2", *extra,
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "Warning" not in done.stdout and "WARNING" not in done.stdout and "built successfully" not in done.stdout
    assert "training " in done.stdout and "eval  step     2" in done.stdout


# ---- default learning rates ----------------------------------------------------------------------------------

def test_defaults_come_from_the_kind_and_mixed_kinds_need_an_lr():
    from graftr.adapters.gated_prompt import GatedPromptConfig
    from graftr.adapters.ia3 import IA3Config
    from graftr.adapters.ina import InAConfig
    from graftr.train.config import TrainConfig, resolve_defaults

    cfg, note = resolve_defaults(TrainConfig(), [GatedPromptConfig()], global_batch=64)
    # LLaMA-Adapter's official rule: base lr 9e-3 × batch / 256, 2 warm-up epochs of 5, cosine, weight decay 0.02
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_ratio, cfg.weight_decay) == (9e-3 * 64 / 256, "cosine", 0.4, 0.02)
    assert note.startswith("gated_prompt defaults: lr 0.009 × batch 64 / 256, cosine, warmup 0.4")
    cfg, note = resolve_defaults(TrainConfig(lr=1e-2, warmup_steps=3), [IA3Config()], global_batch=8)
    assert (cfg.lr, cfg.warmup_steps, cfg.warmup_ratio) == (1e-2, 3, None)  # what the recipe set stays
    assert "train.lr is the recipe's" in note
    with pytest.raises(GraftrError, match=r"different default learning rates \(ia3 0.003, ina 0.0005\): set train.lr"):
        resolve_defaults(TrainConfig(), [IA3Config(), InAConfig()], global_batch=8)
    cfg, note = resolve_defaults(TrainConfig(lr=1e-3), [IA3Config(), InAConfig()], global_batch=8)
    assert cfg.lr == 1e-3 and note is None

    class OwnConfig(AdapterConfig):  # a user kind without training_defaults
        kind: Literal["test_own"] = "test_own"

    with pytest.raises(GraftrError, match=r"adapter kind 'test_own' has no default learning rate: set train.lr"):
        resolve_defaults(TrainConfig(), [OwnConfig()], global_batch=8)
    cfg, note = resolve_defaults(TrainConfig(), [OwnConfig(), IA3Config()], global_batch=8)
    assert cfg.lr == 3e-3 and note.startswith("ia3 defaults (test_own has none of its own): lr 0.003")


# ---- a run directory that moves ------------------------------------------------------------------------------

def test_a_moved_run_still_loads_evaluates_and_generates(models, tmp_path, capsys, monkeypatch):
    """Trained with a relative --model from one directory, moved, used from another: the adapter recorded the base's
    absolute path, and the run directory serves wherever an adapter directory does."""
    import shutil

    from transformers import AutoModelForCausalLM

    from graftr import load_adapter

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(models("ia3_llama.yaml"), work / "tiny-llama")
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert cli.main(["train", str(RECIPES / "ia3_llama.yaml"), "--model", "tiny-llama", "--data",
                     str(DATA["causal_lm"]), "--out", "runs/x", "train.max_steps=2"]) == 0
    manifest = json.loads((work / "runs" / "x" / "adapter" / "manifest.json").read_text())
    assert manifest["base_model"] == str((work / "tiny-llama").resolve())
    elsewhere.mkdir()
    shutil.move(work / "runs" / "x", elsewhere / "x")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", "x", "--data", str(DATA["causal_lm"]), "--split", "train"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["generate", "--adapter", "x", "--prompt", "Name a colour.", "--max-new-tokens", "2"]) == 0
    gm = load_adapter(AutoModelForCausalLM.from_pretrained(work / "tiny-llama"), "x")  # the run dir, not x/adapter
    assert gm.recipe.name == "ia3_llama"


def test_a_user_kind_travels_with_its_adapter(models, tmp_path):
    """The module a recipe's ``imports:`` names is copied next to the adapter; a fresh process elsewhere loads it."""
    from test_core import _user_kind_module
    from transformers import AutoModelForCausalLM

    from graftr import graft, save_adapter

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "travel_kinds.py").write_text(_user_kind_module("test_travelling_shift"))
    (work / "recipe.yaml").write_text("name: travel\nimports: [travel_kinds]\nrules: [{name: shift, match: {path: "
                                      "lm_head}, adapter: {kind: test_travelling_shift, init: 0.5}}]\n")
    base = models("ia3_llama.yaml")
    save_adapter(graft(AutoModelForCausalLM.from_pretrained(base), load_recipe(work / "recipe.yaml")),
                 work / "run" / "adapter")
    assert (work / "run" / "adapter" / "travel_kinds.py").read_text() == (work / "travel_kinds.py").read_text()
    (work / "travel_kinds.py").unlink()  # the user's copy is gone; the adapter's is enough
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    for trust in (False, True):
        script = (f"from transformers import AutoModelForCausalLM; import graftr; gm = graftr.load_adapter("
                  f"AutoModelForCausalLM.from_pretrained({str(base)!r}), {str(work / 'run')!r}, trust_code={trust}); "
                  "print(gm.recipe.rules[0].adapter.kind)")
        done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, env=env,
                              timeout=300)
        if trust:
            assert done.returncode == 0 and done.stdout.strip() == "test_travelling_shift", done.stderr
        else:  # an adapter directory is data: its code runs only when its user says so
            assert done.returncode != 0 and "pass --trust-code (Python: trust_code=True)" in done.stderr
            assert "travel_kinds.py" in done.stderr
    command = [sys.executable, "-m", "graftr.cli", "generate", "--adapter", str(work / "run"), "--prompt", "Hi",
                   "--max-new-tokens", "1"]
    for extra, code in (([], 2), (["--trust-code"], 0)):
        done = subprocess.run(command + extra, cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == code, done.stdout + done.stderr
        if code:
            assert done.stderr.startswith("error: ") and "--trust-code" in done.stderr.splitlines()[0], done.stderr


def test_every_argument_has_help_and_the_version_prints(capsys):
    import argparse

    for name in ["apply", "inspect", "validate", "schema", *cli.COMMAND_MODULES]:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        missing = [a.option_strings or a.dest for a in sub._actions
                   if a.help is None and not isinstance(a, argparse._HelpAction)]
        assert not missing, f"graftr {name}: no help for {missing}"
    capsys.readouterr()
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("graftr ")


@pytest.mark.parametrize("args", [["--help"], ["validate", *sorted(str(p) for p in RECIPES.glob("*.yaml"))],
                                  ["schema", "--out", "{tmp}/schema.json"]], ids=["help", "validate", "schema"])
def test_the_quick_commands_import_no_library(args, tmp_path):
    """``graftr --help``, ``validate`` (every shipped recipe, against every built-in kind) and ``schema`` run without
    importing torch, transformers, datasets, DeepSpeed or matplotlib (start-up speed; the times are in
    docs/benchmarks.md): the built-in kinds' configs live in graftr/adapters/config.py, the sections' in
    graftr/sections.py."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    script = ("import sys, graftr.cli\n"
              f"try:\n    code = graftr.cli.main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
              "print(code, sorted(m for m in ('torch', 'transformers', 'datasets', 'deepspeed', 'matplotlib') "
              "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    if args[0] == "validate":
        assert done.stdout.count("✓") == len(args) - 1, done.stdout
    if args[0] == "schema":
        kinds = json.loads((tmp_path / "schema.json").read_text())["$defs"]
        assert {"IA3Config", "InAConfig", "GatedPromptConfig", "ScaleBiasConfig", "QuantizeConfig",
                "VisionConfig", "DataConfig"} <= set(kinds)
