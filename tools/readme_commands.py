"""Print one of the README's two set-up commands (``demo`` or ``test``), so CI runs exactly what users read.

The README opens with a fenced ``bash`` block holding two lines: the demo command, then the test command.
"""

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def commands() -> dict[str, str]:
    text = README.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 2:
        raise SystemExit(f"{README}: the first bash block must hold exactly two commands, found {len(lines)}")
    return {"demo": lines[0], "test": lines[1]}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("demo", "test"):
        raise SystemExit("usage: readme_commands.py demo|test")
    print(commands()[sys.argv[1]])
