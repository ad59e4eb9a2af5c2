"""``graftr train``: the loss falls for every adapter kind; ZeRO-2 and ZeRO-3 on two processes compute what one
process computes; a killed run resumes to exactly the uninterrupted result; a non-finite loss stops the run; bad
data and settings are one-line errors with exit code 2.

Single-process runs call the CLI in this process (DeepSpeed with a process group of one, ~3 s each). Runs on two
processes (``--nproc 2``, through the DeepSpeed launcher on CPU) and the killed run are ``python -m graftr.cli``
subprocesses (~10 s to start, ~35 s for two processes on two cores). The models are the tiny 2-layer ones of
:mod:`after_training_kit`, with a real WordPiece tokenizer; the data is written here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from after_training_kit import cli_error, model_dir
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from graftr import cli, graft, load_adapter
from graftr.data import Collator, DataConfig, build_datasets
from graftr.errors import GraftrError
from graftr.evaluate import evaluate
from graftr.models import load_tokenizer, resolve
from graftr.recipe import parse_recipe
from graftr.train import checkpoint
from graftr.train.config import deepspeed_config, merge_user_config

# Set by a single-process run in this process (graftr.train.distributed.init_distributed); a subprocess that inherited
# them would take itself for one rank of a launched job.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")

INSTRUCTIONS = [("Name a colour.", "", "Blue."), ("Add the numbers.", "2 and 3", "5"),
                ("Write a greeting.", "", "Hello there."), ("Reverse the word.", "stop", "pots"),
                ("Name an animal.", "", "A cat."), ("Give the opposite.", "hot", "cold"),
                ("Count to three.", "", "one two three"), ("Spell the word.", "dog", "d o g")]
WORDS = "the a cat dog sat ran on under mat tree house big small red blue green quickly slowly".split()
PAIRS = [("the cat sat on the mat", "a cat sat", "yes"), ("the dog ran under the tree", "a cat ran", "no"),
         ("a big red house", "a house", "yes"), ("the small blue car", "a green car", "no"),
         ("the dog sat quickly", "the dog sat", "yes"), ("a tree on the hill", "a house on the hill", "no"),
         ("the green mat", "the mat", "yes"), ("the cat ran slowly", "the dog ran", "no")]

RULES = {
    "ia3": '{name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}',
    "ina": '{name: ina_qv, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, '
           'adapter: {kind: ina, rank: 4, alpha: 8, dropout: 0.0}}',
    "gated_prompt": '{name: prompt, match: {op: attention}, adapter: {kind: gated_prompt, length: 4}}',
}


def recipe(path: Path, rules: list[str], train: str, head: str = "") -> str:
    """Write a recipe (``rules`` are flow mappings, ``train`` the train: section's lines) and return its path."""
    text = f"name: {path.stem}\n{head}rules:\n" + "".join(f"  - {r}\n" for r in rules) + "train:\n"
    path.write_text(text + "".join(f"  {line}\n" for line in train.strip().splitlines()))
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def records(out, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def train_here(capsys, *argv: str) -> str:
    """``graftr train ARGV`` in this process; returns its output, fails on a non-zero exit."""
    capsys.readouterr()
    code = cli.main(["train", *argv])
    output = capsys.readouterr()
    assert code == 0, output.err
    return output.out


def graftr_train(*argv: str, cwd: Path, script: list[str] | None = None, env: dict | None = None, wait=True):
    """``python -m graftr.cli train ARGV`` (or ``python -c SCRIPT train ARGV``) as a subprocess, offline."""
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    command = [sys.executable, *(script or ["-m", "graftr.cli"]), "train", *argv]
    proc = subprocess.Popen(command, cwd=cwd, env={**clean, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return output


def adapter_tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "adapter" / "adapter.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process runs set the launch variables; later tests of the session must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny Llama (causal LM) and BERT (two-class classifier) directories, and the data sets."""
    root = tmp_path_factory.mktemp("train")
    model_dir(root / "llama", "llama")
    model_dir(root / "bert", "bert", "seq_cls", num_labels=2)
    write_jsonl(root / "alpaca.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS])
    docs = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(4 + i % 7)) for i in range(48)]
    write_jsonl(root / "text" / "train.jsonl", [{"text": d} for d in docs[:40]])
    write_jsonl(root / "text" / "validation.jsonl", [{"text": d} for d in docs[40:]])
    pairs = [{"premise": p, "hypothesis": h, "answer": y} for p, h, y in PAIRS]
    write_jsonl(root / "pairs" / "train.jsonl", pairs)
    write_jsonl(root / "pairs" / "validation.jsonl", pairs)
    return root



def test_sample_answers_before_and_after_as_many_as_asked(root, tmp_path, capsys):
    """``train.samples``: the first N held-out prompts answered before and after training (4 by default), recorded
    in the adapter's manifest, the first shown; 0 generates none."""
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows)
    path = recipe(tmp_path / "s.yaml", [RULES["ia3"]], "max_steps: 1\nmicro_batch_size: 4\n")
    shown = {}
    for samples in (None, 2, 0):
        out = tmp_path / f"out{samples}"
        capsys.readouterr()
        assert cli.main(["train", path, "--model", str(root / "llama"), "--data", str(tmp_path / "data"),
                         "--out", str(out), *([f"train.samples={samples}"] if samples is not None else [])]) == 0
        training = json.loads((out / "adapter" / "manifest.json").read_text())["training"]
        shown[samples] = (training["before"]["answers"], training["before"]["answers_after"],
                          "answer before training:" in capsys.readouterr().out)
    assert [(len(before), len(after), line) for before, after, line in shown.values()] == \
        [(4, 4, True), (2, 2, True), (0, 0, False)]
    assert shown[2][0] == shown[None][0][:2]  # the same first prompts, answered the same way

# ---- one process: the loss falls, the adapter loads back ---------------------------------------------------

LOWERS = """
max_steps: 6
micro_batch_size: 8
lr: 0.05
lr_schedule: constant
warmup_steps: 0
log_every: 1
data: {format: alpaca, max_length: 64, eval_split: null}
"""


@pytest.fixture(scope="module")
def lowered(root, tmp_path_factory):
    """Per adapter kind, 6 steps on the 8 alpaca examples, all in every batch (one step per epoch)."""
    runs = {}
    for kind, rule in RULES.items():
        out = tmp_path_factory.mktemp(kind)
        code = cli.main(["train", recipe(out / f"{kind}.yaml", [rule], LOWERS), "--model", str(root / "llama"),
                         "--data", str(root / "alpaca.jsonl"), "--out", str(out / "run")])
        assert code == 0
        runs[kind] = out / "run"
    return runs


def whole_set_loss(gm, root, data: str, cfg: DataConfig, task: str) -> float:
    """The loss of ``gm`` on the train split of ``data`` as one batch, as the training loop computes it."""
    tokenizer = load_tokenizer(resolve(str(root)))
    train_set, _, _ = build_datasets(data, cfg, tokenizer, task=task)
    keep = set(gm.graftr_input_names) | {"labels"}
    collate = Collator(tokenizer)
    loader = DataLoader(train_set, batch_size=len(train_set),
                        collate_fn=lambda rows: {k: v for k, v in collate(rows).items() if k in keep})
    return evaluate(gm.eval(), loader, task=task)["loss"]


@pytest.mark.parametrize("kind", list(RULES))
def test_loss_falls_and_the_adapter_loads_back(lowered, root, kind):
    out = lowered[kind]
    log = records(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and {r["lr"] for r in log} == {0.05}
    losses = [r["loss"] for r in log]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # the same batch every step: strictly lower
    assert losses[-1] < losses[0] - 0.01
    assert [r["tokens"] for r in log] == [log[0]["tokens"] * (i + 1) for i in range(6)]

    manifest = json.loads((out / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 6 and manifest["training"]["world_size"] == 1
    saved = adapter_tensors(out)
    base = AutoModelForCausalLM.from_pretrained(root / "llama")
    gm = load_adapter(base, out / "adapter")
    state = gm.adapter_state_dict()
    assert sorted(state) == sorted(saved) and all(torch.equal(state[n], saved[n]) for n in saved)
    # the base model's loss is the first step's (every adapter starts as the identity); the trained one is lower
    cfg = DataConfig(format="alpaca", max_length=64, eval_split=None)
    data = str(root / "alpaca.jsonl")
    before = whole_set_loss(graft(base, gm.recipe), root / "llama", data, cfg, "causal_lm")  # at its init
    after = whole_set_loss(gm, root / "llama", data, cfg, "causal_lm")
    assert before == pytest.approx(losses[0], abs=1e-4)
    assert after < losses[0] - 0.01


def test_classification_of_pairs(root, tmp_path, capsys):
    """String labels of sentence pairs (sorted into class names), IA³ plus the head, evaluation during training."""
    rules = ['{name: ia3_kv, match: {path: "bert.encoder.layer.*.attention.self.{key,value}"}, adapter: {kind: ia3}}']
    path = recipe(tmp_path / "pairs.yaml", rules, """
max_steps: 6
micro_batch_size: 8
lr: 0.05
lr_schedule: constant
log_every: 2
eval_every: 3
data: {format: classification, text_column: premise, text_pair_column: hypothesis, label_column: answer}
""", head="task: seq_cls\ntrainable_modules: [classifier]\n")
    text = train_here(capsys, path, "--model", str(root / "bert"), "--data", str(root / "pairs"),
                      "--out", str(tmp_path / "run"))
    assert "training 194 of" in text  # IA³ on key and value (2 × 2 × 32) and the head (32 × 2 + 2)
    log, evals = records(tmp_path / "run"), records(tmp_path / "run", "eval")
    assert [r["step"] for r in log] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]  # 0: the base
    assert log[-1]["loss"] < log[0]["loss"]
    assert evals[-1]["loss"] < log[0]["loss"]  # the eval split is the train split: trained on it
    assert set(evals[-1]) == {"kind", "step", "loss", "accuracy"}
    manifest = json.loads((tmp_path / "run" / "adapter" / "manifest.json").read_text())
    assert manifest["base_config"]["id2label"] == {"0": "no", "1": "yes"}
    assert manifest["training"]["final_eval"]["step"] == 6
    gm = load_adapter(AutoModelForSequenceClassification.from_pretrained(root / "bert"), tmp_path / "run" / "adapter")
    cfg = DataConfig(format="classification", text_column="premise", text_pair_column="hypothesis",
                     label_column="answer")
    loss = whole_set_loss(gm, root / "bert", str(root / "pairs"), cfg, "seq_cls")
    assert loss == pytest.approx(evals[-1]["loss"], abs=1e-5)


@pytest.mark.slow  # torch.compile of the forward and backward graphs on CPU: ~40 s
def test_compile_gives_the_eager_losses(lowered, root, tmp_path, capsys):
    path = recipe(tmp_path / "ia3.yaml", [RULES["ia3"]], LOWERS)
    train_here(capsys, path, "--model", str(root / "llama"), "--data", str(root / "alpaca.jsonl"),
               "--out", str(tmp_path / "run"), "train.compile=true", "train.max_steps=3")
    eager = [r["loss"] for r in records(lowered["ia3"])][:3]
    assert [r["loss"] for r in records(tmp_path / "run")] == pytest.approx(eager, abs=1e-5)
    torch._dynamo.reset()


# ---- two processes: ZeRO-2 and ZeRO-3 equal one process ------------------------------------------------------

ZERO = """
max_steps: 4
micro_batch_size: 4
lr: 0.02
weight_decay: 0.1
max_grad_norm: 0.03
log_every: 1
data: {format: text, packing: true, max_length: 16}
"""


@pytest.fixture(scope="module")
def zero_runs(root, tmp_path_factory):
    """The same 4 steps of 4 packed blocks: one process (micro-batch 4), two processes (micro-batch 2 each) under
    ZeRO-2 and ZeRO-3. Every kind at once: IA³ on k/v, InA on q, gated prompts on the attention of layer 1."""
    out = tmp_path_factory.mktemp("zero")
    rules = [RULES["ia3"], '{name: ina_q, match: {path: "model.layers.*.self_attn.q_proj"}, '
             'adapter: {kind: ina, rank: 4, alpha: 8, dropout: 0.0}}',
             '{name: prompt, match: {op: attention, layers: {last: 1}}, adapter: {kind: gated_prompt, length: 4}}']
    path = recipe(out / "zero.yaml", rules, ZERO)
    common = [path, "--model", str(root / "llama"), "--data", str(root / "text")]
    shm_before = shm_segments()
    assert cli.main(["train", *common, "--out", str(out / "one")]) == 0
    logs = {stage: graftr_train(*common, "--out", str(out / f"zero{stage}"), "--nproc", "2",
                                "train.micro_batch_size=2", f"train.zero_stage={stage}", cwd=out) for stage in (2, 3)}
    (out / "shm-left.json").write_text(json.dumps(sorted(shm_segments() - shm_before)))
    return out, logs


def shm_segments() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (67 MB of RAM each)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.mark.slow
def test_no_shared_memory_is_left_behind(zero_runs):
    # DeepSpeed's CPU shared-memory op would create one segment per rank and never unlink it; graftr does not build
    # the op (graftr.train.loop._init_distributed), so no segment exists
    out, _ = zero_runs
    assert json.loads((out / "shm-left.json").read_text()) == []


@pytest.mark.slow  # two processes through the DeepSpeed launcher: ~35 s per stage
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_equal_one(zero_runs, stage):
    out, logs = zero_runs
    assert f"on 2 process(es), ZeRO-{stage}, fp32: 4 steps of 4 examples" in logs[stage]
    # ZeRO-3 runs the layers outlined (outline_layers: auto), so it gathers one layer's parameters at a time
    assert ("outlined 2 layers" in logs[stage]) == (stage == 3)
    one, two = records(out / "one"), records(out / f"zero{stage}")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert all(r["grad_norm"] > 0.03 for r in one)  # clipping acted, on the norm over both processes' partitions
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    (base_one, eval_one), (base_two, eval_two) = records(out / "one", "eval"), records(out / f"zero{stage}", "eval")
    assert base_one["step"] == base_two["step"] == 0 and base_two["loss"] == pytest.approx(base_one["loss"], rel=1e-6)
    assert eval_two["loss"] == pytest.approx(eval_one["loss"], rel=1e-6)
    a, b = adapter_tensors(out / "one"), adapter_tensors(out / f"zero{stage}")
    assert sorted(a) == sorted(b) and len(a) == 2 * 2 + 2 * 2 + 2  # ia3 k/v, ina A/B per layer, prompt + gate
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    assert json.loads((out / f"zero{stage}" / "adapter" / "manifest.json").read_text())["training"]["world_size"] == 2


# ---- kill and resume -----------------------------------------------------------------------------------------

# InA dropout draws from the RNG, accumulation of 2 micro-batches, 2 steps per epoch (10 examples: 2 are skipped),
# warmup over 4 of the 6 steps: the resumed run needs the RNG, the data position and the scheduler state.
RESUME = """
max_steps: 6
micro_batch_size: 2
gradient_accumulation_steps: 2
lr: 0.02
warmup_steps: 4
lr_schedule: constant
save_every: 1
log_every: 1
data: {format: alpaca, max_length: 64, eval_split: null}
"""
# A `graftr train` that stops for good inside the save of the PAUSE_AT_SAVE-th checkpoint, after DeepSpeed wrote
# its files into step-N.tmp and before the rename that completes it; it touches PAUSE_MARKER there.
PAUSE = """
import os, sys, time
import graftr.train.checkpoint as checkpoint
from graftr import cli
calls, rng_state = [], checkpoint.rng_state
def pause():
    calls.append(1)
    if len(calls) == int(os.environ["PAUSE_AT_SAVE"]):
        open(os.environ["PAUSE_MARKER"], "w").close()
        time.sleep(3600)
    return rng_state()
checkpoint.rng_state = pause
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def resume_runs(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS]
    data = write_jsonl(out / "alpaca.jsonl", rows + rows[:2])
    rule = RULES["ina"].replace("dropout: 0.0", "dropout: 0.2")
    common = [recipe(out / "resume.yaml", [rule], RESUME), "--model", str(root / "llama"), "--data", data]
    graftr_train(*common, "--out", str(out / "whole"), cwd=out)

    marker = out / "paused"
    proc = graftr_train(*common, "--out", str(out / "killed"), cwd=out, wait=False, script=["-c", PAUSE],
                        env={"PAUSE_AT_SAVE": "4", "PAUSE_MARKER": str(marker)})
    deadline = time.monotonic() + 300
    while not marker.exists():  # the checkpoints of steps 1-3 are complete, step 4's is being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed = {"checkpoints": sorted(p.name for p in (out / "killed" / "checkpoints").glob("step-*")),
              "latest": (out / "killed" / "checkpoints" / "latest").read_text(),
              "steps": [r["step"] for r in records(out / "killed")]}
    resumed = graftr_train(*common, "--out", str(out / "killed"), "--resume", cwd=out)
    return out, common, killed, resumed


def same_run(a, b) -> None:
    """Equal per-step records (but the timings) and equal adapters."""
    timing = ("tokens_per_s", "step_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in records(a)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in records(b)]
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert torch.allclose(x[name], y[name], rtol=0, atol=1e-7), name


@pytest.mark.slow  # three subprocess runs: ~30 s
def test_kill_and_resume_equals_the_uninterrupted_run(resume_runs):
    out, _, killed, resumed = resume_runs
    assert killed["checkpoints"] == ["step-2", "step-3", "step-4.tmp"]  # keep_checkpoints 2; step 4's save was cut
    assert killed["latest"] == "step-3" and killed["steps"] == [1, 2, 3, 4]  # step 4 was logged before its save
    assert "removed" in resumed and "step-4.tmp, a checkpoint whose save was interrupted" in resumed
    assert "resumed from" in resumed and "step-3 at step 3/6" in resumed
    assert "settings changed" not in resumed
    same_run(out / "whole", out / "killed")
    assert [r["lr"] for r in records(out / "whole")] == [0.005, 0.01, 0.015, 0.02, 0.02, 0.02]
    assert sorted(p.name for p in (out / "killed" / "checkpoints").glob("step-*")) == ["step-5", "step-6"]


@pytest.mark.slow  # shares the uninterrupted run of the test above
def test_stop_and_resume_with_more_steps(resume_runs, tmp_path, capsys):
    """Without a kill: 3 steps, then --resume with max_steps 6. The schedule (warmup, then constant) does not depend
    on the total, so the result is the uninterrupted run's."""
    out, common, _, _ = resume_runs
    train_here(capsys, *common, "--out", str(tmp_path / "run"), "train.max_steps=3")
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]
    text = train_here(capsys, *common, "--out", str(tmp_path / "run"), "train.max_steps=6", "--resume")
    assert "settings changed since step-3 (total_steps 3 -> 6): steps after 3 use the new ones" in text
    same_run(out / "whole", tmp_path / "run")


# ---- checkpoint atomicity ------------------------------------------------------------------------------------


class FakeEngine:
    """Writes what ``engine.save_checkpoint`` writes into the tag directory: one file; or fails as a full disk."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, directory, tag, save_latest, exclude_frozen_parameters):
        assert not save_latest and exclude_frozen_parameters
        (Path(directory) / tag).mkdir()
        torch.save({"module": {"w": torch.ones(2)}}, Path(directory) / tag / "model_states.pt")
        if self.fail:
            raise OSError(28, "No space left on device", str(Path(directory) / tag / "model_states.pt"))


def test_checkpoint_save_is_atomic(tmp_path):
    from graftr.train.distributed import init_distributed as _init_distributed

    _init_distributed()  # a process group of one (save() synchronises the ranks)
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.latest(ckpt) is None and checkpoint.remove_incomplete(ckpt) == []
    for step in (1, 2):
        assert checkpoint.save(FakeEngine(), ckpt, step, {"tokens": step}, keep=2) == ckpt / f"step-{step}"
    meta = checkpoint.read_meta(ckpt / "step-2")
    assert {k: meta[k] for k in ("step", "tokens", "format_version")} == {"step": 2, "tokens": 2, "format_version": 2}
    assert sorted(meta["files"]) == ["model_states.pt", "rng_rank0.safetensors"]
    assert sorted(p.name for p in (ckpt / "step-2").iterdir()) == ["graftr.json", "model_states.pt",
                                                                   "rng_rank0.safetensors"]

    # a save that fails half-way (a full disk) is one error; its step-3.tmp is removed, the others are intact
    with pytest.raises(GraftrError, match=r"could not save the checkpoint of step 3: cannot write .*model_states.pt: "
                                          r"No space left on device \(a checkpoint takes .* free in .*checkpoints\); "
                                          "training stopped .* the checkpoints step-1, step-2 are intact"):
        checkpoint.save(FakeEngine(fail=True), ckpt, 3, {}, keep=2)
    assert not (ckpt / "step-3.tmp").exists() and checkpoint.latest(ckpt) == ckpt / "step-2"
    (ckpt / "step-3.tmp").mkdir()  # what a kill during the save leaves
    (ckpt / "step-10.tmp").mkdir()  # a later, incomplete one does not count either
    assert checkpoint.latest(ckpt) == ckpt / "step-2"
    # step-3.tmp of the failed save is cleared when step 3 is saved again; step-1 rotates out (keep 2)
    checkpoint.save(FakeEngine(), ckpt, 3, {}, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-10.tmp", "step-2", "step-3"]
    assert checkpoint.remove_incomplete(ckpt) == ["step-10.tmp"]
    # a kill between the rename and the update of `latest`: the complete directory counts, not the file
    (ckpt / "latest").write_text("step-2")
    (ckpt / "step-11").mkdir()
    assert checkpoint.latest(ckpt) == ckpt / "step-11" and checkpoint.complete(ckpt)[0] == ckpt / "step-2"
    with pytest.raises(GraftrError, match="step-11 is not a graftr checkpoint"):
        checkpoint.read_meta(ckpt / "step-11")
    # resume takes the newest that verifies: step-11 has no record, step-3 is whole
    assert checkpoint.choose(ckpt) == (ckpt / "step-3", [f"{ckpt / 'step-11'}: graftr.json cannot be read ("
                                       f"[Errno 2] No such file or directory: '{ckpt / 'step-11' / 'graftr.json'}')"])


def test_resume_refuses_another_batch_geometry(tmp_path):
    saved = {"world_size": 2, "micro_batch_size": 4, "seed": 0, "trainable": {"a.w": [4]}}
    checkpoint.check_fingerprint(tmp_path, saved, dict(saved))
    with pytest.raises(GraftrError, match=r"world_size: checkpoint 2, now 1; trainable tensors differ \(1: b.w\)"):
        checkpoint.check_fingerprint(tmp_path, saved, {**saved, "world_size": 1, "trainable": {"a.w": [4], "b.w": [2]}})


# ---- a non-finite loss ---------------------------------------------------------------------------------------

CLS_RULE = '{name: ia3_kv, match: {path: "bert.encoder.layer.*.attention.self.{key,value}"}, adapter: {kind: ia3}}'
CLS_TRAIN = """
max_steps: 4
micro_batch_size: 4
lr: 0.01
lr_schedule: linear
warmup_steps: 0
save_every: 1
log_every: 1
data: {format: classification, text_column: premise, text_pair_column: hypothesis, label_column: answer}
"""


def test_non_finite_loss_stops_and_keeps_the_checkpoints(root, tmp_path, capsys):
    """lr 1e30: the first step's update overflows the activations, the second step's loss is NaN."""
    path = recipe(tmp_path / "cls.yaml", [CLS_RULE], CLS_TRAIN, head="task: seq_cls\ntrainable_modules: [classifier]\n")
    out = tmp_path / "run"
    error = cli_error(capsys, ["train", path, "--model", str(root / "bert"), "--data", str(root / "pairs"),
                               "--out", str(out), "train.lr=1e30"])
    assert "non-finite loss (nan) at step 2: training stopped, nothing after step 1 was applied; the newest " \
           f"checkpoint is {out / 'checkpoints' / 'step-1'}; to continue, --resume with a lower train.lr" in error
    assert checkpoint.latest(out / "checkpoints") == out / "checkpoints" / "step-1"
    assert not (out / "checkpoints" / "step-2.tmp").exists() and not (out / "adapter").exists()
    assert [r["step"] for r in records(out)] == [1]


def test_resume_with_a_lower_lr_after_a_non_finite_loss(root, tmp_path, capsys, monkeypatch):
    """A NaN loss at step 3 (injected): the run stops after the checkpoint of step 2; resumed with another lr, the
    lr of the restored optimizer and scheduler is replaced and the run finishes."""
    from graftr.grafted import GraftedModel

    path = recipe(tmp_path / "cls.yaml", [CLS_RULE], CLS_TRAIN, head="task: seq_cls\ntrainable_modules: [classifier]\n")
    argv = ["train", path, "--model", str(root / "bert"), "--data", str(root / "pairs"), "--out", str(tmp_path / "run")]
    loss, calls = GraftedModel._loss, []

    def poisoned(self, out, labels, *args, **kwargs):
        if out.logits.device.type != "meta":  # not the memory estimate's forward on meta
            calls.append(1)
        return loss(self, out, labels, *args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(GraftedModel, "_loss", poisoned)
    assert "non-finite loss (nan) at step 3" in cli_error(capsys, argv)
    monkeypatch.setattr(GraftedModel, "_loss", loss)
    text = train_here(capsys, *argv[1:], "--resume", "train.lr=0.001")
    assert "settings changed since step-2 (lr 0.01 -> 0.001): steps after 2 use the new ones" in text
    # linear decay over 4 steps: steps 1-2 at 0.01 × (1, 0.75), steps 3-4 at 0.001 × (0.5, 0.25)
    assert [r["lr"] for r in records(tmp_path / "run")] == pytest.approx([0.01, 0.0075, 0.0005, 0.00025])


# ---- bad data and settings: one line, exit code 2 ------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("missing_column", "split 'train' of {data} has no column 'premise' (columns: text, answer)"),
    ("empty", "{data}/train.jsonl holds no example (the dataset is empty)"),
    ("train.nope=1", "override train.nope=1: train.nope: Extra inputs are not permitted"),
    ("train.zero_stage=5", "override train.zero_stage=5: train.zero_stage: Input should be 0, 1, 2 or 3, got 5"),
    ("train.zero_stage=0 train.offload=optimizer", "cls.yaml:5 with override train.zero_stage=0 "
     "train.offload=optimizer: train: offload: optimizer needs zero_stage 1, 2 or 3"),
    ("train.zero_stage=3 train.compile=true", "cls.yaml:5 with override train.zero_stage=3 train.compile=true: "
     "train: compile does not work with zero_stage 3"),
    ("train.micro_batch_size=16", "the train split has 8 examples, fewer than one optimizer step needs "
     "(micro_batch_size 16 × gradient_accumulation_steps 1 × 1 processes)"),
    ("train.deepspeed_config=missing.json", "train.deepspeed_config: missing.json does not exist"),
    ("checkpoints", "holds checkpoints of an earlier run (newest step-7); pass --resume to continue it"),
    ("config_only", "meta-llama/Llama-2-7b-hf resolves to a config only (snapshot); training needs the weights"),
    ("--hostfile hosts", "--hostfile only apply with --nproc"),
])
def test_bad_data_and_settings(root, tmp_path, capsys, case, message):
    path = recipe(tmp_path / "cls.yaml", [CLS_RULE], CLS_TRAIN, head="task: seq_cls\n")
    model, data, extra = str(root / "bert"), str(root / "pairs"), case.split() if "=" in case or "--" in case else []
    if case in ("missing_column", "empty"):
        data = str(tmp_path / "data")
        rows = [{"text": "a", "answer": "yes"}] if case == "missing_column" else []
        write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    if case == "checkpoints":
        (tmp_path / "run" / "checkpoints" / "step-7").mkdir(parents=True)
    if case == "config_only":
        model = "meta-llama/Llama-2-7b-hf"
    error = cli_error(capsys, ["train", path, "--model", model, "--data", data, "--out", str(tmp_path / "run"), *extra])
    assert message.format(data=data) in error


def test_recipe_without_train_section(root, tmp_path, capsys):
    """Every train: field has a default (tests/test_first_hour.py trains the shipped recipes that have none)."""
    path = tmp_path / "plain.yaml"
    path.write_text(f"name: plain\nrules:\n  - {CLS_RULE}\n")
    assert cli_error(capsys, ["train", str(path), "--model", str(root / "bert"), "--data", "x.jsonl"]) == (
        "error: data file not found: x.jsonl")


def test_user_deepspeed_config(tmp_path):
    cfg = parse_recipe(f"name: t\nrules:\n  - {CLS_RULE}\ntrain: {{lr: 0.1, max_steps: 1, micro_batch_size: 4, "
                       "data: {format: classification}}\n").train
    generated = deepspeed_config(cfg, world_size=2)
    assert generated["train_batch_size"] == 8 and generated["zero_optimization"] == {"stage": 2}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 1000},
                                "gradient_clipping": 0.5}))
    merged, notes = merge_user_config(generated, str(user))
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert notes == [f"{user} overrides gradient_clipping: 1.0 -> 0.5"]
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(GraftrError, match="sets 'train_micro_batch_size_per_gpu'; graftr derives it from "
                                          "train.micro_batch_size, set that in the recipe instead"):
        merge_user_config(generated, str(user))
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))  # graftr outlines and checks compile by it
    with pytest.raises(GraftrError, match="sets 'zero_optimization.stage'; graftr derives it from train.zero_stage"):
        merge_user_config(generated, str(user))


def test_the_deepspeed_launcher_rank_argument_is_accepted():
    """``deepspeed --module graftr.cli train ...`` (without --no_local_rank) puts --local_rank=N first."""
    args = cli.build_parser("train").parse_args(["--local_rank=1", "train", "r.yaml", "--data", "d", "train.max_steps=2"])
    assert (args.command, args.recipe, args.overrides) == ("train", "r.yaml", ["train.max_steps=2"])
