"""The hostile-input and fault campaign of issue 19, one test (or a few) per class of failure.

1. no code runs from a run directory (planted pickles in checkpoints, imports from an adapter directory) or from a
   model directory (a pickled ``pytorch_model.bin`` is refused by every command);
2. nothing is written outside the chosen output directory (recipe names are plain names);
3. no silent wait: DeepSpeed's CPU shared-memory op is never built, so a stale build lock cannot block a start;
4. no user file is replaced (``--out`` of merge/export/apply needs ``--force``; train checks ``--out`` first), and a
   run refused on bad input leaves no ``--out`` behind;
5. every crash is resumable (damaged newest checkpoint, torn metrics line, kills at every moment of a checkpoint
   save, a full disk) to the adapter an uninterrupted run writes, bit for bit;
6. malformed files and configs are one ``error:`` line (safetensors headers, manifest.json, model configs, rank
   larger than the model, an lr that overflows or is infinite);
7. inputs that would spin are bounded by the model's size (brace globs, a 10 MB recipe, YAML alias bombs);
8. messages: a broken JSONL line with its file:line, overrides anywhere on the command line, a loss that cannot
   improve.

The models are the tiny ones of :mod:`after_training_kit` (a real WordPiece tokenizer, 2 layers).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from after_training_kit import cli_error, model_dir
from safetensors.torch import load_file

from graftr import cli, selectors
from graftr.errors import GraftrError, RecipeError
from graftr.recipe import YAML_LOADER, parse_recipe
from graftr.train import checkpoint

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
TEXTS = ["the cat sat on the mat", "a dog ran under the tree", "the big red house", "a small blue car",
         "the green mat", "the cat ran slowly", "a tree on the hill", "the dog sat quickly"]
IA3 = '{name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}'


def write_recipe(path: Path, rules: list[str], train: str = "", name: str | None = None) -> str:
    text = f"name: {name or path.stem}\nrules:\n" + "".join(f"  - {r}\n" for r in rules)
    if train:
        text += "train:\n" + "".join(f"  {line}\n" for line in train.strip().splitlines())
    path.write_text(text)
    return str(path)


TRAIN = """
max_steps: 2
micro_batch_size: 4
lr: 0.01
log_every: 1
data: {format: text, max_length: 32, eval_split: null}
"""


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process runs set the launch variables; later tests of the session must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model_dir(root / "llama", "llama")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---- 1 and 5: checkpoints are data, and resume takes the newest that verifies ----------------------------------

# InA dropout draws from the RNG, 2 micro-batches per step, 2 steps per epoch: a resume needs the RNG, the data
# position, the optimizer and the scheduler (warmup) exactly.
RESUME_RULES = [IA3, '{name: ina_q, match: {path: "model.layers.*.self_attn.q_proj"}, '
                     'adapter: {kind: ina, rank: 2, alpha: 4, dropout: 0.2}}']
RESUME = """
max_steps: 4
micro_batch_size: 2
gradient_accumulation_steps: 2
lr: 0.02
warmup_steps: 3
lr_schedule: constant
save_every: 1
keep_checkpoints: 4
log_every: 1
data: {format: text, max_length: 32, eval_split: null}
"""
TIMING = ("tokens_per_s", "step_s", "elapsed_s")


def train_here(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = cli.main(["train", *argv])
    output = capsys.readouterr()
    assert code == 0, output.err
    return " ".join(output.out.split())


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a: Path, b: Path) -> None:
    """Equal per-step records (but the timings) and bit-for-bit equal adapters."""
    assert records(a) == records(b)
    x, y = load_file(str(a / "adapter" / "adapter.safetensors")), load_file(str(b / "adapter" / "adapter.safetensors"))
    assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The uninterrupted run: 4 steps, a checkpoint after each (all kept)."""
    work = tmp_path_factory.mktemp("reference")
    path = write_recipe(work / "resume.yaml", RESUME_RULES, RESUME)
    argv = [path, "--model", str(root / "llama"), "--data", str(root / "text.jsonl")]
    assert cli.main(["train", *argv, "--out", str(work / "run")]) == 0
    return work / "run", argv


def interrupted(reference, out: Path, steps: tuple[int, ...]) -> Path:
    """What a run killed after the checkpoint of max(steps) leaves: those checkpoints, the metrics up to it."""
    run, _ = reference
    for step in steps:
        shutil.copytree(run / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:max(steps)]))
    return out


def rehash(step_dir: Path) -> None:
    """Make graftr.json agree with the files (an attacker who edits the record too)."""
    meta = json.loads((step_dir / "graftr.json").read_text())
    for name in meta["files"]:
        data = (step_dir / name).read_bytes()
        meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "graftr.json").write_text(json.dumps(meta))


class Payload:
    """A pickle that creates a marker file when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_damaged_newest_checkpoint_and_a_torn_log_line_resume_from_the_previous_one(reference, tmp_path, capsys):
    out = interrupted(reference, tmp_path / "run", (2, 3))
    optim = next((out / "checkpoints" / "step-3").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # truncated
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a kill mid-write
    text = train_here(capsys, *reference[1], "--out", str(out), "--resume")
    assert f"note: --resume skips {out / 'checkpoints' / 'step-3'}: {optim.name} is damaged (its size differs" in text
    assert "dropped a torn last line" in text and "resumed from" in text and "step-2 at step 2/4" in text
    same_run(reference[0], out)


@pytest.mark.parametrize("record", ["kept", "rewritten"])
def test_a_planted_pickle_never_runs(reference, tmp_path, capsys, record):
    """A payload in the newest checkpoint: with the record untouched its hash gives it away; with the record
    rewritten to match, the pickle scan refuses its global. Either way it is skipped, unpickled never, and the run
    resumes from the previous checkpoint to the uninterrupted result."""
    marker = tmp_path / "pwned"
    out = interrupted(reference, tmp_path / "run", (2, 3))
    planted = out / "checkpoints" / "step-3" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, planted, _use_new_zipfile_serialization=True)
    if record == "rewritten":
        rehash(planted.parent)
    payload = shutil.copy(planted, tmp_path / "payload.pt")  # the resumed run replaces step-3
    text = train_here(capsys, *reference[1], "--out", str(out), "--resume")
    reason = "refers to posix.system, which graftr never unpickles" if record == "rewritten" else \
        "is damaged (its size differs"
    assert f"--resume skips {planted.parent}: {planted.name} {reason}" in text
    assert not marker.exists()
    same_run(reference[0], out)
    # DeepSpeed's engine loads through graftr's, as data only
    with pytest.raises(GraftrError, match="cannot load .* as data: Weights only load failed"):
        checkpoint.safe_load(payload)
    with pytest.raises(GraftrError, match="as data"):
        checkpoint.safe_engine_class()().load(str(payload))
    assert not marker.exists()


def test_no_checkpoint_that_verifies_is_one_error(reference, tmp_path, capsys):
    out = interrupted(reference, tmp_path / "run", (1,))
    (out / "checkpoints" / "step-1" / "rng_rank0.pt").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    error = cli_error(capsys, ["train", *reference[1], "--out", str(out), "--resume"])
    assert error == (f"error: --resume: no checkpoint in {out / 'checkpoints'} verifies ({out / 'checkpoints' / 'step-1'}"
                     ": rng_rank0.pt is not part of the checkpoint); remove them to start the run over")
    assert not (tmp_path / "pwned").exists()


def test_an_adapter_directory_never_imports_code_beside_it(reference, tmp_path, capsys):
    """An adapter's recipe may name modules in imports:; a module file planted next to it is not imported."""
    adapter = tmp_path / "adapter"
    shutil.copytree(reference[0] / "adapter", adapter)
    text = (adapter / "recipe.yaml").read_text().replace("imports: []", "imports: [planted_kinds]")
    (adapter / "recipe.yaml").write_text(text)
    (adapter / "planted_kinds.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    error = cli_error(capsys, ["export", str(adapter), "--out", str(tmp_path / "peft")])
    assert f"the adapter's kind comes from {adapter / 'planted_kinds.py'}" in error and "--trust-code" in error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "peft").exists()


def test_a_pickled_model_is_refused_by_every_command_and_never_unpickled(root, tmp_path, capsys):
    """A model directory whose weights are only a pickle (``pytorch_model.bin``, here one that runs code when
    unpickled): every command reading weights refuses it in one line, before unpickling anything; train leaves no
    --out. ``export`` reads only the base's structure (config.json) and never opens it."""
    model, marker, work = tmp_path / "pickled", tmp_path / "pwned", tmp_path / "work"
    shutil.copytree(root / "llama", model)
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model / "pytorch_model.bin")
    work.mkdir()
    recipe, adapter, data = write_recipe(work / "ia3.yaml", [IA3], TRAIN), str(work / "adapter"), \
        str(root / "text.jsonl")
    assert cli.main(["apply", recipe, "--model", str(root / "llama"), "--out", adapter]) == 0
    expected = (f"error: {model} holds pytorch_model.bin (a pickle) and no *.safetensors; graftr reads model weights "
                "only from safetensors: convert it, e.g. with transformers' from_pretrained and save_pretrained "
                "(which writes safetensors)")
    for argv in (["generate", "--adapter", adapter, "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"],
                 ["merge", adapter, "--model", str(model), "--out", str(work / "merged")],
                 ["eval", "--adapter", adapter, "--model", str(model), "--data", data, "--split", "train"],
                 ["train", recipe, "--model", str(model), "--data", data, "--out", str(work / "run")]):
        assert cli_error(capsys, argv) == expected, argv
    assert cli.main(["export", adapter, "--model", str(model), "--out", str(work / "peft")]) == 0
    assert not marker.exists()
    assert sorted(p.name for p in work.iterdir()) == ["adapter", "ia3.yaml", "peft"]


DAMAGED_ADAPTERS = {
    "truncated tensors": ("adapter.safetensors", lambda b: b[: len(b) // 2], "is not a readable safetensors file"),
    "header length past the end": ("adapter.safetensors", lambda b: (2**40).to_bytes(8, "little") + b[8:],
                                   "is not a readable safetensors file"),
    "header not JSON": ("adapter.safetensors", lambda b: b[:8] + b"\xff" * (len(b) - 8),
                        "is not a readable safetensors file"),
    "manifest not JSON": ("manifest.json", lambda b: b[: len(b) // 2], "manifest.json"),
    "manifest of another type": ("manifest.json", lambda b: b"[1, 2]", "manifest.json"),
    "manifest field of the wrong type": ("manifest.json",
                                         lambda b: b.replace(b'"format_version": 1', b'"format_version": "1"'),
                                         "format_version is a str"),
}


@pytest.mark.parametrize("case", list(DAMAGED_ADAPTERS))
def test_a_damaged_adapter_is_one_line(reference, tmp_path, capsys, case):
    """Bytes of an adapter directory cut or overwritten: every command reading it says which file, in one line."""
    name, damage, message = DAMAGED_ADAPTERS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(reference[0] / "adapter", adapter)
    before = (adapter / name).read_bytes()
    (adapter / name).write_bytes(damage(before))
    assert (adapter / name).read_bytes() != before
    for argv in (["export", str(adapter), "--out", str(tmp_path / "peft")],
                 ["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "1"]):
        assert message in cli_error(capsys, argv), argv
    assert not (tmp_path / "peft").exists()


# ---- 5. a full disk ----------------------------------------------------------------------------------------------

def test_a_failed_write_while_saving_is_one_line_and_resumes(reference, tmp_path, capsys, monkeypatch):
    """torch.save fails as it does on a full disk (a C++ "enforce fail" RuntimeError) in the save of step 3: one
    error line, no .tmp left, the checkpoints of steps 1-2 intact; --resume then completes to the same adapter."""
    out = tmp_path / "run"
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if "step-3" in str(f):
            raise RuntimeError(f"[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 "
                               f"PytorchStreamWriter failed writing file data/0: file write failed")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    error = cli_error(capsys, ["train", *reference[1], "--out", str(out)])
    assert error.startswith("error: could not save the checkpoint of step 3: cannot write ") and \
        error.endswith("the checkpoints step-1, step-2 are intact: free space and --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-1", "step-2"]
    monkeypatch.setattr(torch, "save", save)
    text = train_here(capsys, *reference[1], "--out", str(out), "--resume")
    assert "step-2 at step 2/4" in text
    same_run(reference[0], out)


# what torch.save raises on a full disk (measured on a 1 MB tmpfs): the zip writer's stream stopped short
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def test_a_full_disk_on_resume_is_one_line_with_the_space_and_resumes(reference, tmp_path, capsys, monkeypatch):
    """A --resume whose first checkpoint save meets a full disk (torch.save's own error, which says only "unexpected
    pos"): one line naming the directory, what a checkpoint takes and what is free; the earlier checkpoints are
    byte for byte as they were, and once there is space --resume completes to the uninterrupted adapter."""
    from graftr import errors
    from graftr.quantize import human_bytes
    from graftr.train import checkpoint as checkpoint_module

    out = interrupted(reference, tmp_path / "run", (1, 2))
    ckpt = out / "checkpoints"
    def saved() -> dict:
        return {p: p.read_bytes() for p in ckpt.glob("step-*/**/*") if p.is_file()}

    before = saved()
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-3" in str(f):
            raise RuntimeError(TORCH_FULL_DISK)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    for module in (errors, checkpoint_module):
        monkeypatch.setattr(module, "free_space", lambda path: 12 * 1024)
    error = cli_error(capsys, ["train", *reference[1], "--out", str(out), "--resume"])
    size = sum(p.stat().st_size for p in (ckpt / "step-2").rglob("*") if p.is_file())
    assert error.startswith(f"error: could not save the checkpoint of step 3: cannot write {ckpt / 'step-3.tmp'}/")
    assert error.endswith(f": no space left on device (a checkpoint takes {human_bytes(size)}, 12.00 KiB free in "
                          f"{ckpt}); training stopped and {ckpt / 'step-3.tmp'} was removed, the checkpoints step-1, "
                          "step-2 are intact: free space and --resume"), error
    assert saved() == before and sorted(p.name for p in ckpt.glob("step-*")) == ["step-1", "step-2"]
    monkeypatch.undo()
    text = train_here(capsys, *reference[1], "--out", str(out), "--resume")
    assert "step-2 at step 2/4" in text
    same_run(reference[0], out)


def test_a_plot_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    """loss.png on a full disk: one error, the previous picture unchanged, no temporary file left."""
    from matplotlib.figure import Figure

    from graftr.plot import save_png

    out = tmp_path / "loss.png"
    out.write_bytes(b"the previous plot")

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(GraftrError) as e:
        save_png(Figure(), out)
    assert str(e.value) == f"cannot write {out}: No space left on device; {out} is unchanged"
    assert out.read_bytes() == b"the previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


DISK_FULL = r"""
set -u
mount -t tmpfs -o size={size} tmpfs "$MNT" || exit 99
"$PYTHON" -m graftr.cli train {argv} --out "$MNT/run" > "$HOST/full.log" 2>&1; echo $? > "$HOST/full.rc"
ls -R "$MNT/run" > "$HOST/full.ls"
mount -o remount,size=256m tmpfs "$MNT"
"$PYTHON" -m graftr.cli train {argv} --out "$MNT/run" --resume > "$HOST/resumed.log" 2>&1; echo $? > "$HOST/resumed.rc"
cp -r "$MNT/run/adapter" "$MNT/run/metrics.jsonl" "$HOST/"
"""


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.slow  # two subprocess runs in a mount namespace: ~40 s
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (a private tmpfs mount)")
def test_a_full_disk_is_one_line_and_resumes(reference, tmp_path):
    """A real full disk: --out on a tmpfs (in a private mount namespace) half the size the run writes fills up in
    a checkpoint save;
    the run stops with one error line and no .tmp left; the tmpfs grown, --resume completes to the same adapter."""
    host, mnt = tmp_path / "host", tmp_path / "mnt"
    host.mkdir()
    mnt.mkdir()
    argv = " ".join(f"'{a}'" for a in reference[1])
    # half of what the run writes (tmpfs counts whole pages per file): the disk fills during a checkpoint save
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in reference[0].rglob("*") if p.is_file())
    script = DISK_FULL.format(size=f"{used // 2 // 1024}k", argv=argv)
    env = {**subprocess_env(), "MNT": str(mnt), "HOST": str(host), "PYTHON": sys.executable}
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == 99 or not (host / "full.rc").exists():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    log = (host / "full.log").read_text().strip().splitlines()
    assert (host / "full.rc").read_text().strip() == "2", log[-5:]
    assert log[-1].startswith("error: could not save the checkpoint of step ") and "no space left on device" in \
        log[-1].lower() and not any("Traceback" in line for line in log), log[-5:]
    assert ".tmp" not in (host / "full.ls").read_text()
    assert (host / "resumed.rc").read_text().strip() == "0", (host / "resumed.log").read_text()[-2000:]
    x = load_file(str(reference[0] / "adapter" / "adapter.safetensors"))
    y = load_file(str(host / "adapter" / "adapter.safetensors"))
    assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)
    assert records(host) == records(reference[0])


# ---- 5. kills at random moments ------------------------------------------------------------------------------

# `graftr train` that counts the I/O calls of training (from the DeepSpeed engine on: torch.save, os.replace,
# os.rename, os.fsync, shutil.rmtree, safetensors' save_file, metrics lines) and SIGKILLs itself at the
# KILL_AT-th, before or after the call; a metrics line it kills at is written half. KILL_AT=0 counts only.
KILLER = r"""
import json, os, signal, sys
import shutil, torch, safetensors.torch
target, count, on = int(os.environ["KILL_AT"]), [0], [False]
def tick():
    if on[0]:
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
def wrap(module, name):
    call = getattr(module, name)
    def wrapped(*args, **kwargs):
        tick(); result = call(*args, **kwargs); tick(); return result
    setattr(module, name, wrapped)
for module, name in [(torch, "save"), (os, "replace"), (os, "rename"), (os, "fsync"), (shutil, "rmtree"),
                     (safetensors.torch, "save_file")]:
    wrap(module, name)
from graftr.train import checkpoint, metrics
install = checkpoint.install_engine
def start(engine):
    install(engine); on[0] = True
checkpoint.install_engine = start
write = metrics.Recorder.write
def torn(self, record):
    if on[0] and count[0] + 1 == target:
        line = json.dumps(record); self.file.write(line[: len(line) // 2]); self.file.flush()
    tick(); write(self, record)
metrics.Recorder.write = torn
from graftr import cli
code = cli.main(sys.argv[1:])
print("EVENTS", count[0])
sys.exit(code)
"""


def killer(argv: list[str], out: Path, kill_at: int, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, "train", *argv, "--out", str(out)], cwd=cwd,
                          env={**subprocess_env(), "KILL_AT": str(kill_at)}, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow  # 1 + 3 subprocess runs and 3 resumes: ~2 min
def test_kills_at_random_moments_resume_to_the_uninterrupted_adapter(reference, tmp_path, capsys):
    counted = killer(reference[1], tmp_path / "counted", 0, tmp_path)
    assert counted.returncode == 0, counted.stdout[-2000:] + counted.stderr[-2000:]
    events = int(counted.stdout.split("EVENTS")[-1])
    same_run(reference[0], tmp_path / "counted")  # the instrumented run is the uninterrupted one
    moments = sorted(random.Random(19).sample(range(1, events + 1), 3))
    for moment in moments:
        out = tmp_path / f"killed-{moment}"
        proc = killer(reference[1], out, moment, tmp_path)
        assert proc.returncode == -signal.SIGKILL, (moment, events, proc.stdout[-2000:], proc.stderr[-2000:])
        train_here(capsys, *reference[1], "--out", str(out), "--resume")
        assert not list(out.rglob("*.tmp")), moment
        same_run(reference[0], out)


# ---- 4. no user file is replaced ---------------------------------------------------------------------------------

def test_merge_and_export_never_replace_a_directory_of_yours(reference, root, tmp_path, capsys):
    adapter = str(reference[0] / "adapter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for command in (["merge", adapter, "--model", str(root / "llama")], ["export", adapter]):
        error = cli_error(capsys, [*command, "--out", str(mine)])
        assert error == f"error: {mine} exists and is not a graftr output directory (it holds notes.txt); refusing to " \
                        "replace it"
        assert cli_error(capsys, [*command, "--out", str(mine), "--force"]) == error  # --force is not enough
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    # an earlier output of the same kind: refused without --force (saying what is there), replaced with it
    first, apply = tmp_path / "first", ["apply", write_recipe(tmp_path / "ia3.yaml", [IA3]), "--model", str(root / "llama")]
    assert cli.main([*apply, "--out", str(first)]) == 0
    error = cli_error(capsys, [*apply, "--out", str(first)])
    assert error == f"error: {first} exists and holds 3 files (adapter.safetensors, manifest.json, recipe.yaml); " \
                    "pass --force to replace it"
    assert cli.main([*apply, "--out", str(first), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "ia3.yaml", "mine"]  # no temporary directory left


@pytest.mark.parametrize("case", ["file", "foreign", "earlier"])
def test_train_refuses_an_unusable_out_before_any_work(reference, tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("mine")
    elif case == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    else:
        shutil.copytree(reference[0], out)
        shutil.rmtree(out / "checkpoints")
    error = cli_error(capsys, ["train", *reference[1], "--out", str(out)])
    assert error == {"file": f"error: --out {out} is a file, not a directory",
                     "foreign": f"error: --out {out} holds files that are not a graftr run (thesis.tex); choose an "
                                "empty or new directory",
                     "earlier": f"error: --out {out} holds an earlier run (adapter, metrics.jsonl); pass --resume to "
                                "continue it or choose another --out"}[case]


def data_file(text: str):
    def make(tmp: Path) -> str:
        (tmp / "data.jsonl").write_text(text)
        return str(tmp / "data.jsonl")
    return make


def damaged_model(*names: str, truncated: bool = False):
    """A copy of the tiny Llama directory without the files ``names`` (or with them cut in half)."""
    def make(tmp: Path, root: Path) -> str:
        shutil.copytree(root / "llama", tmp / "model")
        for name in names:
            file = tmp / "model" / name
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2]) if truncated else file.unlink()
        return str(tmp / "model")
    return make


# bad input → the model (None: the tiny Llama), the data (None: 8 texts), overrides, and words of the error
BAD_INPUTS = {
    "no model directory": (lambda tmp, root: str(tmp / "nowhere"), None, [], "does not exist"),
    "damaged safetensors": (damaged_model("model.safetensors", truncated=True), None, [],
                            "is not a readable safetensors file"),
    "no tokenizer": (damaged_model("tokenizer.json", "tokenizer_config.json"), None, [], "cannot load a tokenizer"),
    "no data file": (None, lambda tmp: str(tmp / "missing.jsonl"), [], "data file not found"),
    "empty data file": (None, data_file(""), [], "holds no example"),
    "broken JSON": (None, data_file('{"text": "a b"}\n{"text": "torn\n'), [], ":2: invalid JSON"),
    "bad labels": (None, data_file('{"text": "a b", "label": 1.5}\n{"text": "c d", "label": 0}\n'),
                   ["task=seq_cls", "train.data.format=classification"], "label 1.5 (float) is not an integer"),
    "too few examples": (None, data_file('{"text": "a b"}\n{"text": "c d"}\n'), [],
                         "fewer than one optimizer step needs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_run_refused_on_bad_input_leaves_no_out(root, tmp_path, capsys, case):
    """Bad model, tokenizer, data or recipe, found after --out was checked: one error, and the directories the run
    made for --out (here two levels) are gone again."""
    model, data, overrides, message = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    path = write_recipe(work / "r.yaml", [IA3], TRAIN)
    model = model(work, root) if model else str(root / "llama")
    data = data(work) if data else str(root / "text.jsonl")
    out = tmp_path / "runs" / "r"
    error = cli_error(capsys, ["train", path, "--model", model, "--data", data, "--out", str(out), *overrides])
    assert message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_refused_run_leaves_a_directory_that_was_there_as_it_was(reference, root, tmp_path, capsys):
    """An empty directory of yours, and a run directory continued with --resume: kept, with what they held."""
    mine = tmp_path / "mine"
    mine.mkdir()
    missing = str(tmp_path / "missing.jsonl")
    error = cli_error(capsys, ["train", reference[1][0], "--model", str(root / "llama"), "--data", missing,
                               "--out", str(mine)])
    assert error == f"error: data file not found: {missing}" and mine.is_dir() and not list(mine.iterdir())
    out = interrupted(reference, tmp_path / "run", (1, 2))
    before = files_under(out)
    error = cli_error(capsys, ["train", reference[1][0], "--model", str(root / "llama"), "--data", missing,
                               "--out", str(out), "--resume"])
    assert error == f"error: data file not found: {missing}" and files_under(out) == before


# ---- 2. nothing escapes the output directory -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/graftr-absolute", "a/b", "..", ".hidden", "x y"])
def test_a_recipe_name_is_never_a_path(root, tmp_path, capsys, monkeypatch, name):
    """Without --out, `graftr train` writes to runs/<name>: a name is a plain name, refused before any work."""
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = write_recipe(work / "r.yaml", [IA3], TRAIN, name=json.dumps(name))
    error = cli_error(capsys, ["train", path, "--model", str(root / "llama"), "--data", str(root / "text.jsonl")])
    assert "r.yaml:1: name: String should match pattern" in error
    assert files_under(tmp_path) == {"deep", "deep/work", "deep/work/r.yaml"}
    assert not Path("/tmp/graftr-absolute").exists()


# ---- 3. no silent wait on a JIT build -------------------------------------------------------------------------

FLAT = '{name: dead, match: {path: "model.layers.*.self_attn.q_proj"}, adapter: {kind: ina, rank: 2, ' \
       'inhibition: 1.0, activation: relu}}'


def test_a_stale_build_lock_cannot_block_a_start_and_a_flat_loss_is_reported(root, tmp_path, capsys, monkeypatch):
    """A run killed while DeepSpeed JIT-built its CPU shared-memory op left the build's lock behind; torch would
    wait on it for ever, printing nothing. graftr does not build the op at all (it serves only tensor-parallel
    inference): the run completes, and nothing is built into the extensions directory.

    The same run shows class 8's flat loss: InA with inhibition 1 and ReLU thresholds every value at its maximum,
    so the branch is 0 and so is every gradient; the run says the loss cannot improve."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    path = write_recipe(tmp_path / "flat.yaml", [FLAT], TRAIN)
    capsys.readouterr()
    code = cli.main(["train", path, "--model", str(root / "llama"), "--data", str(root / "text.jsonl"),
                     "--out", str(tmp_path / "run")])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert files_under(extensions) == {"deepspeed_shm_comm", "deepspeed_shm_comm/lock"}
    text = " ".join(output.out.split())
    assert "note: the gradient of every trainable tensor is 0 at step 1: the loss cannot improve" in text
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ['MASTER_PORT']}_*"))


# ---- 6. malformed configs: one line ------------------------------------------------------------------------------

def test_non_finite_numbers_are_refused_everywhere():
    for value in (".inf", "-.inf", ".nan", "1e400"):
        with pytest.raises(RecipeError) as e:
            parse_recipe("name: t\nrules:\n  - {name: a, match: {op: linear}, adapter: {kind: ina, alpha: %s}}\n"
                         "train: {lr: %s, max_steps: 1, data: {format: text}}\n" % (value, value))
        assert "rules[0].adapter.alpha: Input should be a finite number" in str(e.value)
        assert "train.lr: Input should be a finite number" in str(e.value)


def test_an_lr_that_overflows_the_optimizer_is_refused(root, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", [IA3], TRAIN)
    error = cli_error(capsys, ["train", path, "--model", str(root / "llama"), "--data", str(root / "text.jsonl"),
                               "--out", str(tmp_path / "run"), "train.lr=1e38"])
    assert error.startswith("error: override train.lr=1e38: train.lr: lr 1e+38 overflows AdamW: its first step moves "
                            "a parameter by 10 × lr, which must be a float32 (lr at most 3.4e+37)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 30}, "is inconsistent: The hidden size (30) is not a multiple of the number of attention heads"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers 1,000,000,000 (no model has more than 4096 layers)"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"hidden_size": "32"}, "is inconsistent: Field 'hidden_size' expected int, got str"),
])
def test_an_inconsistent_model_config_is_one_line(root, tmp_path, capsys, change, message):
    config = {**json.loads((root / "llama" / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = write_recipe(tmp_path / "r.yaml", [IA3])
    error = cli_error(capsys, ["apply", path, "--model", str(tmp_path / "config.json"), "--dry-run"])
    assert message in error


@pytest.mark.parametrize("adapter", ["{kind: ina, rank: 1000000000}", "{kind: gated_prompt, length: 1000000000}"])
def test_an_adapter_larger_than_the_model_is_refused_before_allocating(root, tmp_path, capsys, adapter):
    """Validated sizes (rank >= 1) would allocate terabytes: every adapter is built on meta first and counted."""
    match = "{op: linear}" if "ina" in adapter else "{op: attention}"
    path = write_recipe(tmp_path / "r.yaml", [f"{{name: big, match: {match}, adapter: {adapter}}}"])
    error = cli_error(capsys, ["apply", path, "--model", str(root / "llama")])
    assert "rule 'big'" in error and "more than the model it adapts holds" in error


# ---- 7. inputs that would spin ---------------------------------------------------------------------------------

def test_brace_globs_cost_their_length_not_their_expansions():
    pattern = "{a,b}." * 22 + "x"  # 4 million expansions before
    regex = selectors.compile_glob(pattern)
    assert len(regex.pattern) < 400
    assert regex.fullmatch("a.b." * 11 + "x") and not regex.fullmatch("a.c." * 11 + "x")
    # runs of wildcards are one quantifier: no backtracking through every split of a component
    assert selectors.compile_glob("*?" * 40 + "x").pattern.count("[^.]") == 1
    assert not selectors.compile_glob("*?" * 40 + "x").fullmatch("y" * 60)
    with pytest.raises(ValueError, match=r"expand to 4,194,304 patterns \(at most 64\)"):
        selectors.compile_glob("{a.b,c}." * 22 + "x")  # groups holding '.' change the components: bounded
    with pytest.raises(ValueError, match="characters long"):
        selectors.compile_glob("a" * 5000)


def test_a_10_mb_recipe_is_read_with_the_c_loader(tmp_path):
    """libyaml when PyYAML has it (the pure-Python loader takes minutes on 10 MB)."""
    if hasattr(yaml, "CSafeLoader"):
        assert YAML_LOADER is yaml.CSafeLoader
    rules = "".join(f"  - {{name: r{i}, description: {'x' * 5000}, match: {{path: 'model.layers.{i % 2}.mlp.up_proj'}}, "
                    "adapter: {kind: ia3}}\n" for i in range(2_000))
    path = tmp_path / "big.yaml"
    path.write_text("name: big\nrules:\n" + rules)
    assert path.stat().st_size > 10_000_000
    assert len(parse_recipe(path.read_text(), source=str(path)).rules) == 2_000


def test_yaml_alias_bombs_and_deep_nesting_are_one_error():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(7))
    with pytest.raises(RecipeError, match="its aliases expand 31 values to 123,456,801; aliases may repeat parts"):
        parse_recipe("name: t\n" + bomb + "rules: []\n")
    with pytest.raises(RecipeError, match="a recipe must be a mapping|Input should be"):
        parse_recipe("name: t\nrules: " + "[" * 900 + "]" * 900 + "\n")


# ---- 8. message quality ----------------------------------------------------------------------------------------

def test_a_broken_jsonl_line_is_reported_with_its_file_and_line(root, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "a b"}\n{"text": "c d"}\n{"text": "torn\n')
    path = write_recipe(tmp_path / "r.yaml", [IA3], TRAIN)
    error = cli_error(capsys, ["train", path, "--model", str(root / "llama"), "--data", str(data),
                               "--out", str(tmp_path / "run")])
    assert error.startswith(f"error: {data}:3: invalid JSON: Unterminated string")


def test_an_override_gets_the_same_error_anywhere_on_the_command_line(root, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", [IA3], TRAIN)
    data, out = str(root / "text.jsonl"), str(tmp_path / "run")
    errors = {cli_error(capsys, argv) for bad in ("bogus", "train.bogus=1") for argv in (
        ["train", path, bad, "--data", data, "--out", out], ["train", path, "--data", data, bad, "--out", out],
        ["train", path, "--data", data, "--out", out, bad])}
    assert errors == {"error: override 'bogus' is not path.to.field=value (e.g. train.max_steps=20)",
                      "error: override train.bogus=1: train.bogus: Extra inputs are not permitted"}
    # argparse's own errors are one line too
    assert cli_error(capsys, ["train", path, "--data", data, "--nope"]).startswith(
        "error: unrecognized arguments: --nope (see graftr --help)")
