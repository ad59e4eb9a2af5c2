"""What returning freed memory costs a training step, option by option: ``graftr train`` on the real SmolLM2 with
glibc's allocator set each way, step time against peak memory.

    python tools/memory_options.py --json memory_options.json

Each option is one ``graftr train`` process (IA³, the sentiment instructions, batch 8, constant lr, no evaluation,
``--steps`` steps) with ``graftr.train.memory.return_freed_memory`` replaced before the run starts:

* ``never`` — glibc's defaults (its mmap threshold rises after each free of a large block, up to 32 MiB);
* ``threshold 128 KiB`` — ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, what ``train.return_freed_memory: always`` does:
  every tensor above 128 KiB is its own mapping, returned when freed;
* ``threshold 1/4/16 MiB`` — the same at a higher fixed threshold;
* ``trim every step`` — glibc's defaults, and ``malloc_trim(0)`` after each step's backward (the heap's free pages
  returned between steps).

Per option: the median step time after the first ``--skip`` steps (``metrics.jsonl``, ``log_every: 1``), tokens/s,
and the run's measured peak (``VmHWM`` above the start, the manifest's ``training.peak_memory``). Rounds alternate
the options' order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
# option -> Python run before graftr's CLI in the training process
OPTIONS = {
    "never": "m.return_freed_memory = lambda: False",
    "threshold 128 KiB": "",  # graftr's own function: mallopt(M_MMAP_THRESHOLD, 128 KiB)
    "threshold 1 MiB": f"m.return_freed_memory = lambda: bool(libc.mallopt(-3, {MIB}))",
    "threshold 4 MiB": f"m.return_freed_memory = lambda: bool(libc.mallopt(-3, {4 * MIB}))",
    "threshold 16 MiB": f"m.return_freed_memory = lambda: bool(libc.mallopt(-3, {16 * MIB}))",
    "trim every step": ("m.return_freed_memory = lambda: False\n"
                        "import graftr.train.loop as L\n"
                        "_accumulate = L.accumulate\n"
                        "def accumulate(*a, **k):\n"
                        "    stats = _accumulate(*a, **k)\n"
                        "    libc.malloc_trim(0)\n"
                        "    return stats\n"
                        "L.accumulate = accumulate"),
}
PRELUDE = "import ctypes, sys\nimport graftr.train.memory as m\nlibc = ctypes.CDLL('libc.so.6')\n"


def run(option: str, args) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    code = (PRELUDE + OPTIONS[option] + "\nfrom graftr.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", code, "train", str(REPO / "recipes/ia3_llama.yaml"), "--model", args.model,
               "--data", args.data, "--out", str(out), f"train.max_steps={args.steps}", "train.lr_schedule=constant",
               "train.warmup_steps=0", "train.log_every=1", "train.data.eval_split=null",
               # the option decides, not graftr's policy
               f"train.return_freed_memory={'always' if option != 'never' else 'never'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{option} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    times = [r["step_s"] for r in train[args.skip:]]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])][args.skip - 1:]
    peak = json.loads((out / "adapter" / "manifest.json").read_text())["training"]["peak_memory"][0]
    return {"option": option, "step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "peak": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="data/sentiment_instruct")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for round_ in range(args.rounds):
        for option in (list(OPTIONS) if round_ % 2 == 0 else list(OPTIONS)[::-1]):
            r = run(option, args)
            results.append(r)
            print(f"round {round_} {option:18s} {r['step_s']:.3f} s/step {r['tokens_per_s']:6.1f} tok/s "
                  f"peak {r['peak'] / 2**30:.2f} GiB", flush=True)
    print(f"\n`python tools/memory_options.py {' '.join(sys.argv[1:])}`\n")
    print("| option | s/step (each round) | tokens/s | measured peak (each round) |\n|---|---|---|---|")
    for option in OPTIONS:
        mine = [r for r in results if r["option"] == option]
        steps = ", ".join(format(r["step_s"], ".2f") for r in mine)
        peaks = ", ".join(format(r["peak"] / 2**30, ".2f") for r in mine)
        print(f"| {option} | {statistics.median(r['step_s'] for r in mine):.3f} ({steps}) | "
              f"{statistics.median(r['tokens_per_s'] for r in mine):.0f} | "
              f"{statistics.median(r['peak'] for r in mine) / 2**30:.2f} GiB ({peaks}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
