"""Writing results: files replaced whole (written under a temporary name, then renamed),
Markdown tables and figures (PNG plus PDF). Every command that writes a report uses these."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path`: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(value) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4g}" if abs(value) < 0.1 else f"{value:.1f}"


def with_error(value, error) -> str:
    return fmt(value) + (f" ± {error:.1f}" if error is not None and value is not None else "")


def markdown_table(header: list, rows: list[list]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG (path) and PDF (beside it), each under a temporary
    name, then renamed; close it."""
    import matplotlib.pyplot as plt

    for target in (path, path.with_suffix(".pdf")):
        tmp = target.with_name(target.name + ".tmp" + target.suffix)
        fig.savefig(tmp)
        tmp.replace(target)
    plt.close(fig)
