"""Output: rich tables for people, JSON for programs (chosen by --json/--table, else by whether stdout is a tty)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


class Output:
    def __init__(self, mode: str = "auto") -> None:
        tty = sys.stdout.isatty()
        self.json_mode = mode == "json" or (mode == "auto" and not tty)
        self.tty = tty
        # Forced tables on a pipe: wide, no colours, so tests and `| less` read them whole.
        width = None if tty else int(os.environ.get("COLUMNS", "200"))
        self.console = Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    # JSON -----------------------------------------------------------------------------------------
    def json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def json_line(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, default=_json_default, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    # people ---------------------------------------------------------------------------------------
    def table(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              caption: str | None = None) -> None:
        self.console.print(make_table(title, columns, rows, caption))

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.console.print(*objects, **kwargs)

    def note(self, message: str) -> None:
        """A remark for people (stderr), never mixed into JSON on stdout."""
        self.err.print(message, markup=False)


def make_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
               caption: str | None = None) -> Table:
    # min_width: a title is never wrapped into the columns' width
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left",
                  header_style="bold", min_width=len(title or "") + 2)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    return table


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


def lease_text(lease: int | None) -> str:
    """A lease id for people: hex, as etcdctl prints and takes it (`etcdctl lease timetolive 694d...`).
    JSON keeps the number etcd's API uses."""
    return f"{lease:x}" if lease else "none"


def age(seconds: float | None) -> str:
    """Human duration: 45s, 3m12s, 5h03m, 2d04h."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"-{age(-seconds)}"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def since(timestamp: float | None, now: float | None = None) -> float | None:
    if timestamp is None:
        return None
    return round((now if now is not None else time.time()) - timestamp, 3)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
