"""Start-up cost of graftr's command line: modules imported and wall time (median of N runs, hyperfine-style).

    python tools/cli_startup.py [--runs 5] [-- ARGS ...]     # default: --help, --version, validate, schema

Each command runs as ``python -m graftr.cli ARGS`` in a fresh process; the module count comes from
``python -X importtime`` (independent of the machine's load), the times from ``time.perf_counter`` around the
process. docs/benchmarks.md holds the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [["--help"], ["--version"], ["validate", "recipes/ia3_llama.yaml"], ["schema"]]


def measure(args: list[str], runs: int) -> tuple[int, list[float]]:
    command = [sys.executable, "-m", "graftr.cli", *args]
    trace = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], cwd=ROOT, capture_output=True, text=True)
    modules = sum(line.startswith("import time:") for line in trace.stderr.splitlines()) - 1  # minus the header
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
    return modules, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("args", nargs="*", help="one graftr command line (default: four)")
    options = parser.parse_args()
    for args in [options.args] if options.args else DEFAULT:
        modules, times = measure(args, options.runs)
        print(f"graftr {' '.join(args)}: {modules} modules, median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})")


if __name__ == "__main__":
    main()
