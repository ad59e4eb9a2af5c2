"""Command-line argument helpers shared by the commands that take recipe overrides (train, estimate)."""

from __future__ import annotations

import argparse


def collect_overrides(parser: argparse.ArgumentParser) -> None:
    """Make every leftover word that is not an option part of ``args.overrides`` (a positional list)."""
    # argparse stops filling a positional list at the first option, so words written after --data would be
    # rejected as unrecognized arguments: every leftover word that is not an option is an override, wherever it
    # stands, and parse_override judges all of them alike (one error, the same before or after any option).
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, rest = parse(args, namespace)
        extra = [a for a in rest if not a.startswith("-")]
        namespace.overrides = [*(namespace.overrides or []), *extra]
        return namespace, [a for a in rest if a not in extra]

    parser.parse_known_args = parse_known_args
