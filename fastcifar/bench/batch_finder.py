"""`fastcifar bench --find-batch`: the training batch size with the best measured img/s that fits the device
with a memory margin — not merely the largest that fits (past some size a bigger batch trains no faster, and on
a CPU often slower: it falls out of cache).

Each candidate is a bench cell (fastcifar.bench.model_bench.training_rate: the recipe's model, precision,
compile, channels-last, augmentation, loader and optimizer step), timed end to end.

- CUDA: candidates double until one runs out of memory or its peak (torch.cuda.max_memory_reserved: all the
  caching allocator holds) passes (1 - margin) of the memory the process could use at the start (free + its
  own); a binary search between the last batch that fit and the first that did not (multiples of 8) then finds
  the largest that fits, which is timed too.
- CPU / MPS: running out of memory there is the kernel's OOM killer, not an exception, so no candidate is run
  that could cross the margin: each probe's peak resident memory is measured (VmHWM, reset before the probe
  through /proc/self/clear_refs), the next candidate's is extrapolated linearly from the last two, and one
  predicted past (1 - margin) of (available RAM + this process's RSS at the start) is skipped. The doubling stops
  once two candidates in a row time under 90 % of the best (bigger batches stopped paying).
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from fastcifar.bench.model_bench import Cell, Plan, training_rate
from fastcifar.errors import first_line
from fastcifar.step import OOM_ERRORS, OutOfMemory

SLOWER = 0.9  # CPU: stop doubling after two candidates in a row below this fraction of the best img/s
GRAIN = 8  # the binary search's step: batch sizes in multiples of 8 suit tensor cores and vector units


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _available_ram() -> int | None:
    """Bytes this process may still take: MemAvailable, or less under a cgroup limit."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    avail = int(m.group(1)) * 1024 if m else None
    try:
        limit, used = (Path(f"/sys/fs/cgroup/memory.{n}").read_text().strip() for n in ("max", "current"))
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return avail


class Memory:
    """The device's memory limit for a probe, and each probe's peak, in bytes."""

    def __init__(self, device: torch.device, margin: float):
        self.device, self.margin = device, margin
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            self.limit = (1 - margin) * (free + torch.cuda.memory_reserved(device))
            self.kind = "CUDA memory reserved by the caching allocator"
        else:
            rss, avail = _status_kb("VmRSS"), _available_ram()
            self.resettable = _reset_peak_rss()
            self.limit = (1 - margin) * (avail + rss * 1024) if rss is not None and avail is not None else None
            self.kind = "peak resident memory of the process (VmHWM)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_peak_rss()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device)
        kb = _status_kb("VmHWM") if self.resettable else None
        return kb * 1024 if kb is not None else None


def default_candidates(device: torch.device, images: int) -> list[int]:
    lo, hi = (32, 1 << 16) if device.type == "cuda" else (32, 4096)
    return [b for b in (lo << i for i in range(16)) if b <= min(hi, images)]


def probe(store, device: torch.device, plan: Plan, cell: Cell, mem: Memory, log) -> dict[str, Any]:
    mem.start()
    row: dict[str, Any] = {"batch": cell.batch, "img_s": None, "spread": None, "peak_bytes": None, "fits": False,
                           "note": ""}
    t0 = time.perf_counter()
    try:
        out = training_rate(store, device, plan, cell, log=log)
        row.update(img_s=out["train_img_s"], spread=out["train_img_s_spread"])
    except (OutOfMemory, *OOM_ERRORS) as e:
        row["note"] = f"out of memory ({first_line(e)[:80]})"
    row["peak_bytes"] = mem.peak()
    over = mem.limit is not None and row["peak_bytes"] is not None and row["peak_bytes"] > mem.limit
    row["fits"] = row["img_s"] is not None and not over
    if over and not row["note"]:
        row["note"] = f"peak over the {1 - mem.margin:.0%} limit"
    row["seconds"] = time.perf_counter() - t0
    mem.start()  # free what the probe held before the next one
    return row


def _predicted(rows: list[dict[str, Any]], batch: int) -> float | None:
    """The next batch's peak, extrapolated from the last two measured (memory grows linearly with the batch)."""
    known = [r for r in rows if r["peak_bytes"] is not None]
    if len(known) < 2:
        return None
    a, b = known[-2], known[-1]
    slope = max(0.0, (b["peak_bytes"] - a["peak_bytes"]) / (b["batch"] - a["batch"]))
    return b["peak_bytes"] + slope * (batch - b["batch"])


def find_batch(store, device: torch.device, plan: Plan, candidates: list[int], margin: float,
               log: Callable[[str], Any] = print, budget_s: float | None = None) -> dict[str, Any]:
    """Probe the candidates in ascending order (and, on CUDA, binary-search the largest that fits); the best is
    the fitting batch with the highest measured img/s."""
    plan = replace(plan, recipe=replace(plan.recipe, train=replace(plan.recipe.train, oom_retry=False)))
    mem, rows = Memory(device, margin), []
    deadline = time.perf_counter() + budget_s if budget_s else None
    cell = Cell(plan.models[0], plan.precisions[0], 0, plan.compiles[0], plan.channels_last[0])
    for batch in sorted(set(candidates)):
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({"batch": batch, "fits": False, "note": "skipped: --budget spent"})
            continue
        guess = _predicted(rows, batch) if device.type != "cuda" else None
        if guess is not None and mem.limit is not None and guess > mem.limit:
            rows.append({"batch": batch, "fits": False, "peak_bytes": None,
                         "note": f"not run: predicted peak {guess / 2**30:.1f} GiB over the limit"})
            break
        rows.append(probe(store, device, plan, replace(cell, batch=batch), mem, log))
        _log_row(rows[-1], log)
        if not rows[-1]["fits"] or _slowing(rows, device):
            break
    if device.type == "cuda":
        _bisect(store, device, plan, cell, mem, rows, log, deadline)
    return _result(device, plan, cell, mem, rows)


def _slowing(rows: list[dict[str, Any]], device: torch.device) -> bool:
    if device.type == "cuda" or len(rows) < 3:
        return False
    best = max(r["img_s"] for r in rows if r.get("img_s"))
    return all(r.get("img_s") and r["img_s"] < SLOWER * best for r in rows[-2:])


def _bisect(store, device, plan, cell, mem, rows, log, deadline) -> None:
    """Between the largest batch that fit and the smallest that did not, in multiples of GRAIN."""
    fit = [r["batch"] for r in rows if r.get("fits")]
    fail = [r["batch"] for r in rows if r.get("img_s") is None or not r.get("fits")]
    if not fit or not fail or "skipped" in str(rows[-1].get("note")):
        return
    lo, hi = max(fit), min((b for b in fail if b > max(fit)), default=0)
    if not hi:
        return
    while hi - lo > GRAIN and (deadline is None or time.perf_counter() < deadline):
        mid = (lo + hi) // 2 // GRAIN * GRAIN
        if mid <= lo:
            break
        rows.append(probe(store, device, plan, replace(cell, batch=mid), mem, log))
        _log_row(rows[-1], log)
        lo, hi = (mid, hi) if rows[-1]["fits"] else (lo, mid)


def _log_row(row: dict[str, Any], log) -> None:
    rate = f"{row['img_s']:,.0f} img/s" if row.get("img_s") else "no rate"
    peak = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else ""
    log(f"batch {row['batch']}: {rate}{peak}{'' if row['fits'] else ' — ' + row['note']}")


def _result(device, plan, cell, mem, rows) -> dict[str, Any]:
    fits = [r for r in rows if r.get("fits")]
    best = max(fits, key=lambda r: r["img_s"]) if fits else None
    largest = max(fits, key=lambda r: r["batch"]) if fits else None
    return {"kind": "fastcifar-bench-batch", "version": 1, "device": str(device), "model": cell.model,
            "precision": cell.precision, "compile": cell.compile, "channels_last": cell.channels_last,
            "recipe": plan.recipe.name, "margin": mem.margin, "limit_bytes": mem.limit, "memory": mem.kind,
            "rows": sorted(rows, key=lambda r: r["batch"]), "best": best, "largest_fit": largest}


def print_batch_result(result: dict[str, Any], console) -> None:
    from rich.table import Table

    limit = result["limit_bytes"]
    table = Table(title=f"batch finder: {result['model']} {result['precision']} on {result['device']}"
                        + (f", limit {limit / 2**30:.1f} GiB ({1 - result['margin']:.0%} of what was free)"
                           if limit else ""))
    for h in ("batch", "train img/s", "± spread", "peak memory", "note"):
        table.add_column(h, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["batch"]), f"{r['img_s']:,.0f}" if r.get("img_s") else "–",
                      f"{r['spread']:,.0f}" if r.get("spread") is not None else "–",
                      f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else "–", r.get("note", ""))
    console.print(table)
    best, largest = result["best"], result["largest_fit"]
    if best is None:
        console.print("[yellow]no candidate fit; try smaller --batch values[/yellow]")
        return
    console.print(f"best: batch {best['batch']} at {best['img_s']:,.0f} img/s (largest that fits: "
                  f"{largest['batch']} at {largest['img_s']:,.0f} img/s); peaks are {result['memory']}")
    console.print(f"--set train.batch_size={best['batch']}")
    console.print("(a new batch size changes the best learning rate: check it with fastcifar lr-find --set "
                  f"train.batch_size={best['batch']})")
