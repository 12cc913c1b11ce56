"""One writer for every benchmark: the data as JSON, tables for people as markdown, and a plot (PNG)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def environment_markdown(env: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in env.items() if v is not None)


def heading(title: str, description: str, env: dict, command: str) -> list[str]:
    """A report's first lines: what was measured, on what machine, by which command."""
    return [f"# {title}", "", description, f"Environment: {environment_markdown(env)}.", "", f"Command: `{command}`", ""]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def write_report(out: Path, stem: str, results: dict, lines: list[str],
                 plot: Callable[[Any], Any] | None = None) -> None:
    """out/stem.json (results), out/stem.md (lines, then the plot) and, when `plot` is given, out/stem.png:
    `plot(pyplot)` draws and returns the figure."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plot(plt)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
        plt.close(fig)
        lines = [*lines, "", f"![{stem}]({stem}.png)"]
    (out / f"{stem}.md").write_text("\n".join(lines).rstrip("\n") + "\n")
