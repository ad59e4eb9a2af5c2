import os
import sys
from pathlib import Path

# tests/zoo.py is imported as `zoo` by the test modules
sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (the README's `-n 2`) the cores are split between the workers: each worker's torch, and the
# graftr runs it starts, get their share of intra-op threads instead of every process using every core.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

# The longest file first: under `--dist loadfile` each worker runs whole files in the order they were collected,
# and the docs-command test (one test running every documented command in turn, ~20 minutes on one core) collected
# in alphabetical order would start midway and end the run alone. Started first, the other worker takes the rest.
FIRST = ("test_docs_commands.py",)


def pytest_configure(config):
    # pytest-xdist >= 3.6 hands out the files with the most tests first (its loadscope reorder, on by default),
    # which put the docs-command file (two tests, the longest) last: measured, the suite then ended with one worker
    # running it alone for 20 minutes. The order of collection (FIRST, then the rest) is kept instead.
    if getattr(config.option, "loadscopereorder", None):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # a stable sort: everything else keeps its order
