"""argparse value types shared by the `minillm` command and its benchmarks (below both, so neither
imports the other for them)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
