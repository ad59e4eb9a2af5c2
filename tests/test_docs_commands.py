"""The README's and the docs' command lines work as written, in a fresh copy of the repository.

The commands are read from the fenced bash blocks by ``tools/readme_commands.py`` (the same reader CI uses for the
README's set-up line) and run in document order — the README first, whose demo run later documents use — with
bash, offline, in a copy of the tracked files. The README's commands run exactly as written (the set-up line
without its venv and install: the test runs inside the installed venv). In the docs, a ``graftr train`` that sets
no ``train.max_steps`` gets ``train.max_steps=4`` appended, the one change, so the runs stay short; what a
command cannot do here (hub weights, several nodes, files outside the repository) is listed with the reason by
``python tools/readme_commands.py list``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import readme_commands  # noqa: E402

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def fresh_copy(target: Path) -> Path:
    """The files git tracks (and the untracked ones it does not ignore): what a clone holds."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def planned() -> list[tuple[str, str]]:
    """(document, command) pairs to run, in order."""
    plan = []
    for doc in readme_commands.DOCS:
        for command in readme_commands.doc_commands(doc):
            command = readme_commands.without_setup(command) if doc == readme_commands.README else command
            if readme_commands.runnable(command) is not None:
                continue
            if doc != readme_commands.README and command.startswith("graftr train") and "train.max_steps" not in command:
                first, _, rest = command.partition("\n")
                command = "\n".join([first.split("  #")[0].rstrip() + " train.max_steps=4", *([rest] if rest else [])])
            plan.append((doc.relative_to(REPO).as_posix(), command))
    return plan


def test_the_plan_covers_every_document_with_commands():
    docs = {doc for doc, _ in planned()}
    assert {"README.md", "docs/training.md", "docs/after_training.md", "docs/recipes.md"} <= docs
    readme = [command for doc, command in planned() if doc == "README.md"]
    assert readme[0].startswith("graftr train recipes/llama_adapter.yaml --model smollm2") and len(readme) == 7


@pytest.mark.slow  # every documented command: ~25 graftr runs, several minutes on two cores
def test_every_documented_command_runs(tmp_path):
    copy = fresh_copy(tmp_path / "graftr")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    times = []  # GRAFTR_DOCS_TIMES=FILE writes each command's seconds there (what CI's longest test spends where)
    for doc, command in planned():
        start = time.perf_counter()
        done = subprocess.run(["bash", "-e", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=900)
        times.append({"doc": doc, "command": command.splitlines()[0][:160], "s": round(time.perf_counter() - start, 1)})
        if os.environ.get("GRAFTR_DOCS_TIMES"):
            Path(os.environ["GRAFTR_DOCS_TIMES"]).write_text(json.dumps(times, indent=1) + "\n")
        assert done.returncode == 0, f"{doc}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (copy / "runs" / "demo" / "loss.png").is_file() and (copy / "runs" / "compare.png").is_file()
    assert (copy / "runs" / "smollm2" / "loss.png").is_file()  # the README's first command: the real LLM
