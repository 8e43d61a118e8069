"""`--json [FILE]` of eval and predict: the numbers a script wants, as one JSON object.

To stdout (`--json` alone, or `--json -`) nothing else is printed there, so `fastcifar eval CKPT --json | jq` works;
to a file it is written atomically and replaces only a file of the same kind that fastcifar wrote (its "kind"),
checked before the work starts and again at the rename (fastcifar.ownership.output_guard).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fastcifar.atomic import write_json
from fastcifar.ownership import json_ours, output_guard

STDOUT = "-"


class JsonOut:
    """Where `--json` goes (None: not asked for); `kind` ("eval", "predict") names the file kind it may replace."""

    def __init__(self, target: str | None, kind: str):
        self.target, self.kind = target, f"fastcifar-{kind}"
        self.guard = None
        if target not in (None, STDOUT):  # refused now, before any work, if the file is not ours to replace
            self.guard = output_guard(Path(target), f"{kind} JSON", json_ours(lambda d: d.get("kind") == self.kind))

    @property
    def to_stdout(self) -> bool:
        """stdout carries the JSON alone: the human-readable table is not printed."""
        return self.target == STDOUT

    def write(self, obj: dict[str, Any], console) -> None:
        if self.target is None:
            return
        obj = {"kind": self.kind, **obj}
        if self.to_stdout:
            sys.stdout.write(json.dumps(obj, indent=2) + "\n")
            sys.stdout.flush()
            return
        write_json(Path(self.target), obj, self.guard)
        console.print(f"wrote {self.target}", markup=False, highlight=False)
