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
