"""The console every command prints through: rich's own in a terminal; in a file or pipe, lines as long as they are.

rich lays out for 80 columns when it cannot ask a terminal, so `make train > log` used to split every epoch line
in two and a sweep table cut variant names to `train.la…`. A log is read with `less`, `grep` or a browser, none of
which is helped by hard line breaks: there the console is as wide as any line (PIPE_WIDTH) and never wraps.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

PIPE_WIDTH = 100_000  # columns: wider than any line fastcifar prints (a table row of 100 class names is ~1,500)


def make_console(**kwargs: Any) -> Console:
    """Console(**kwargs) in a terminal; elsewhere the same, never wrapping text or cutting a table cell."""
    console = Console(**kwargs)
    if console.is_terminal:
        return console
    return Console(**{**kwargs, "width": PIPE_WIDTH, "soft_wrap": True})
