"""The command lines the README and the docs show, so tests (and CI) run exactly what users read.

``python tools/readme_commands.py demo|test`` prints one of the README's two set-up commands: the README opens
with a fenced ``bash`` block holding two lines, the demo command, then the test command.

``python tools/readme_commands.py list [FILE ...]`` prints every command of the fenced ``bash`` blocks of the
README and ``docs/*.md`` (or of FILEs), one per line, with what :func:`runnable` says of it: ``run`` or
``skip: <reason>``. A command continued with ``\\`` or carrying a here-document (``<<'EOF'`` ... ``EOF``) is one
command. ``tests/test_docs_commands.py`` runs the ``run`` ones in a fresh copy of the repository.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
# the one set-up prefix of the README's first block: a fresh venv and the install (a test runs in one already)
SETUP = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && (pip install [^&]*&& )+")
# commands that cannot run on a machine without GPUs, a second node or hub weights, and why
SKIP = [
    (re.compile(r"shared/fixtures|ina-cola"), "the published InA fixture lies outside the repository (tests/"
                                              "test_peft_interop.py converts it)"),
    (re.compile(r"--hostfile|/shared/"), "an example for several nodes (paths and hosts of a cluster)"),
    (re.compile(r"--nproc|^deepspeed |^torchrun "), "several processes: tests/test_train.py runs them (slow tests)"),
    (re.compile(r"train\.compile=true"), "torch.compile: tests/test_train.py compares it with eager (slow test)"),
    (re.compile(r"^python tools/bench\.py"), "a benchmark (minutes of CPU; tests/test_bench.py runs its smoke test)"),
    (re.compile(r"^flock |^python tools/(quant_bench|seq_bench|random_checkpoint)\.py"),
     "a benchmark or the 7B checkpoint writer (minutes to an hour of CPU, 13.5 GB of disk): docs/benchmarks.md "
     "reports its runs"),
    (re.compile(r"--model DIR\b|--data DATA\b"), "a template: DIR and DATA stand for your model and data"),
    (re.compile(r"recipes/RECIPE\.yaml|train\.lr=LR\b"), "a template for a table's rows: RECIPE and LR stand for "
                                                           "each row's recipe and learning rate (docs/results.md)"),
    (re.compile(r"tools/gpu_check\.sh"), "needs a GPU (run through the device tool; docs/training.md)"),
    (re.compile(r"deepspeed_config=ds_config\.json"), "reads the ds_config.json shown above it as JSON (not a "
                                                       "command); tests/test_train.py checks the merge"),
    (re.compile(r"--adapter runs/hf/"), "the adapter comes from the TRL example of docs/hf.md, Python that "
                                         "tests/test_hf.py and tests/test_harness.py run"),
    (re.compile(r"^graftr merge runs/after/prompt/adapter"), "shows the refusal to merge attention adapters (its "
                                                             "error is printed below it; tests/test_merge.py checks it)"),
    (re.compile(r"^python -m pytest"), "the test suite itself"),
    (re.compile(r"^graftr compare comparisons/\S+ --out "), "a whole comparison (three seeds of every method: 20 "
                                                             "minutes to hours of CPU): docs/results.md reports its runs"),
    (re.compile(r"^graftr deploy "), "exports (and with --compile compiles) SmolLM2, minutes of CPU: tests/test_deploy.py "
                                      "deploys every adapter kind on tiny models, docs/benchmarks.md reports the "
                                      "SmolLM2 run"),
    (re.compile(r"^python tools/(train_bench|memory_options|moe_bench|deploy_bench)\.py"), "a benchmark (minutes to an hour of CPU): docs/benchmarks.md reports "
                                                    "its runs"),
    (re.compile(r"^python tools/make_task_data\.py"), "rewrites the shipped data files (tests/test_real_llm.py "
                                                       "checks they are what it writes)"),
    (re.compile(r"^(graftr (train|merge|generate|eval)\b).*--model meta-llama/"), "needs the Llama-2-7B weights"),
    (re.compile(r"\.\./shared/fixtures|/work/shared/fixtures"), "reads the published InA fixture outside the repository"),
]


def commands() -> dict[str, str]:
    text = README.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 2:
        raise SystemExit(f"{README}: the first bash block must hold exactly two commands, found {len(lines)}")
    return {"demo": lines[0], "test": lines[1]}


def doc_commands(path: Path) -> list[str]:
    """The commands of ``path``'s fenced bash blocks, in order (continuations and here-documents joined)."""
    found = []
    for block in _BLOCK.findall(path.read_text()):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command = [line]
            while command[-1].endswith("\\") and i < len(lines):
                command.append(lines[i])
                i += 1
            heredoc = _HEREDOC.search(command[0])
            if heredoc:
                while i < len(lines):
                    command.append(lines[i])
                    i += 1
                    if lines[i - 1].strip() == heredoc.group(1):
                        break
            found.append("\n".join(command))
    return found


def runnable(command: str) -> str | None:
    """None if the command runs here (offline, CPU, one node), else why not."""
    for pattern, reason in SKIP:
        if pattern.search(command):
            return reason
    return None


def without_setup(command: str) -> str:
    """The README's set-up line without the venv and install part (the test runs inside an installed venv)."""
    return SETUP.sub("", command)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in ("demo", "test"):
        print(commands()[sys.argv[1]])
    elif len(sys.argv) >= 2 and sys.argv[1] == "list":
        for doc in [Path(p) for p in sys.argv[2:]] or DOCS:
            for command in doc_commands(doc):
                reason = runnable(command)
                print(f"{doc.relative_to(ROOT) if doc.is_absolute() else doc}: {'run' if reason is None else 'skip: ' + reason}: "
                      + command.replace("\n", "\\n"))
    else:
        raise SystemExit("usage: readme_commands.py demo|test | list [FILE ...]")
