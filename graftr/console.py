"""The two consoles every command prints through: ``console`` (stdout) and ``errors`` (stderr).

Long paths and notes stay on one line (grep-able); piped output (grep, files, CI logs) is not cut at 80 columns, so
tables keep whole module paths. Commands import these from here, never from :mod:`graftr.cli` (which imports the
commands).
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
errors = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 240)

