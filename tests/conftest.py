import sys
from pathlib import Path

# tests/zoo.py is imported as `zoo` by the test modules
sys.path.insert(0, str(Path(__file__).parent))
