"""Bench results as tables: one column spec renders both the rich terminal table and the Markdown file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from rich.console import Console

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]
NA = "–"


def num(v: Any, digits: int = 0, scale: float = 1.0) -> str:
    if v is None:
        return NA
    return f"{v * scale:,.{digits}f}"


def rate(row: Row, key: str) -> str:
    """mean ± spread (half the range over the repeats)."""
    if row.get(key) is None:
        return NA
    spread = row.get(f"{key}_spread")
    return f"{row[key]:,.0f}" + (f" ± {spread:,.0f}" if spread is not None else "")


def onoff(v: Any) -> str:
    return NA if v is None else ("on" if v else "off")


def ratio(v: Any) -> str:
    return NA if v is None else f"{v:.2f}x"


def pct(v: Any) -> str:
    return NA if v is None else f"{v:.1%}"


def pair(row: Row, a: str, b: str, digits: int = 2) -> str:
    if row.get(a) is None:
        return NA
    return f"{num(row[a], digits)} / {num(row.get(b), digits)}"


_KEY: list[Column] = [
    ("model", lambda r: str(r["model"])), ("px", lambda r: str(r.get("image_size", NA))),
    ("prec", lambda r: str(r["precision"]) + (f"->{r['auto']['precision']}" if r.get("auto") else "")), ("batch", lambda r: str(r["batch"])),
    ("compile", lambda r: onoff(r.get("compile"))), ("CL", lambda r: onoff(r.get("channels_last"))),
]

MODEL_THROUGHPUT: list[Column] = _KEY + [
    ("train img/s (e2e)", lambda r: rate(r, "train_img_s")),
    ("model-only img/s", lambda r: rate(r, "model_only_img_s")),
    ("infer img/s", lambda r: rate(r, "infer_img_s")),
    ("seeds img/s", lambda r: rate(r, "seeds_train_img_s")),
    ("vs seeds", lambda r: ratio(r.get("ratio_vs_seeds"))),
    ("note", lambda r: r.get("note") or r.get("seeds_note") or ""),
]

MODEL_COST: list[Column] = _KEY[:4] + [
    ("lat b1 p50/p99 ms", lambda r: pair(r, "lat_b1_p50_ms", "lat_b1_p99_ms")),
    ("lat serve p50/p99 ms", lambda r: (f"b{r['serve_batch']}: " + pair(r, "lat_serve_p50_ms", "lat_serve_p99_ms"))
     if r.get("serve_batch") else NA),
    ("peak mem MB", lambda r: num(r.get("peak_mem_mb"))),
    ("NVML MB", lambda r: num(r.get("nvml_mem_used_mb"))),
    ("GPU util", lambda r: NA if r.get("gpu_util_pct") is None else f"{r['gpu_util_pct']:.0f}%"),
    ("power W", lambda r: num(r.get("power_w"))),
    ("J/1k img", lambda r: num(r.get("energy_j_per_1k_img"), 1)),
    ("params M", lambda r: num(r.get("params"), 2, 1e-6)),
    ("GFLOP/img fwd | f+b", lambda r: NA if r.get("flops_fwd_per_img") is None else
     f"{r['flops_fwd_per_img'] / 1e9:.3g} | {r['flops_fwdbwd_per_img'] / 1e9:.3g}"),
    ("TFLOP/s", lambda r: num(r.get("train_tflops"), 2)),
    ("MFU", lambda r: pct(r.get("mfu"))),
    ("compile s", lambda r: num(r.get("compile_s"), 1)),
]

LOADER: list[Column] = [
    ("preset", lambda r: str(r["preset"])), ("loader", lambda r: str(r["loader"])),
    ("batch", lambda r: str(r["batch"])), ("img/s", lambda r: rate(r, "img_s")),
    ("vs seeds", lambda r: ratio(r.get("ratio_vs_seeds"))),
    ("output", lambda r: f"{r['dtype']} {'x'.join(map(str, r['shape']))}" if r.get("shape") else NA),
    ("GB/s", lambda r: num(r.get("gb_s"), 1)),
    ("of HBM peak", lambda r: pct(r.get("hbm_frac")) if r.get("gb_s") is not None and r.get("hbm_peak_gb_s")
     else ("unknown peak" if r.get("gb_s") is not None else NA)),
    ("note", lambda r: r.get("note") or ""),
]


PACK: list[Column] = _KEY + [
    ("k", lambda r: str(r["k"])),
    ("packed img/s", lambda r: rate(r, "packed_img_s")),
    ("sequential img/s", lambda r: rate(r, "seq_img_s")),
    ("packed / seq", lambda r: ratio(r.get("ratio"))),
    ("k folds' time / 1 fold's", lambda r: ratio(r.get("time_ratio"))),
    ("peak MB packed", lambda r: num(r.get("packed_peak_mb"))),
    ("peak MB seq", lambda r: num(r.get("seq_peak_mb"))),
    ("mem packed / seq", lambda r: ratio(r.get("mem_ratio"))),
    ("note", lambda r: r.get("note") or ""),
]


def env_line(env: dict[str, Any]) -> str:
    bits = [env.get("device_name"), f"driver {env['driver']}" if env.get("driver") else None,
            _cuda(env), f"torch {env.get('torch')}",
            f"torchvision {env.get('torchvision')}", f"CPU {env.get('cpu')} x{env.get('cpu_cores')}",
            f"load {env['load_avg']}" if env.get("load_avg") else None,
            f"commit {str(env.get('git_commit'))[:10]}{'+dirty' if env.get('git_dirty') else ''}",
            env.get("date")]
    return ", ".join(b for b in bits if b)


def _cuda(env: dict[str, Any]) -> str | None:
    """torch.version.cuda is the CUDA torch was built for, present on a machine without a GPU too: named as the
    runtime only when the bench ran on CUDA."""
    if not env.get("cuda"):
        return None
    return f"CUDA {env['cuda']}" if env.get("device") == "cuda" else f"torch built for CUDA {env['cuda']}; no GPU used"


def rich_table(title: str, columns: list[Column], rows: list[Row]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for r in rows:
        table.add_row(*(escape(fn(r)) for _, fn in columns))  # a note's "fastcifar[dali]" is text, not markup
    return table


def markdown_table(columns: list[Column], rows: list[Row]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(fn(r)) for _, fn in columns) + " |" for r in rows]
    return "\n".join(lines)


def tables_for(result: dict[str, Any]) -> list[tuple[str, list[Column]]]:
    if result["what"] == "loader":
        return [("input pipelines (img/s on the device)", LOADER)]
    if result["what"] == "pack":
        return [("packed k-fold: k folds as one stacked model vs one after another", PACK)]
    return [("training and inference throughput", MODEL_THROUGHPUT), ("latency, memory, energy, FLOPs", MODEL_COST)]


def widen(console: Console, width: int = 220) -> None:
    """A log file does not wrap: print the wide tables whole there instead of folding every cell (a terminal
    keeps its own width)."""
    if not console.is_terminal and console.width < width:
        console.width = width


def print_result(result: dict[str, Any], console: Console) -> None:
    from rich.markup import escape

    widen(console)
    console.print(escape(env_line(result["environment"])))
    for title, cols in tables_for(result):
        console.print(rich_table(title, cols, result["rows"]))
    for note in notes(result):
        console.print(f"[dim]{escape(note)}[/dim]")


def notes(result: dict[str, Any]) -> list[str]:
    s, env = result["settings"], result["environment"]
    out = [f"timing: {s['warmup']} warm-up steps excluded, then {s['repeats']} repeats of {s['seconds']:g} s / "
           f"{s['repeats']}; ± is half the range of the repeats"]
    if result["what"] == "pack":  # no seeds' DataLoader here
        return out + pack_notes(result)
    cores = env.get("cpu_cores_usable") or env.get("cpu_cores")
    if cores and s["workers"] > cores:
        out.append(f"the seeds' {s['workers']} DataLoader workers share {cores} usable CPU cores here")
    if result["what"] == "loader":
        out.append(f"seeds = PIL + per-image torchvision v2 in a DataLoader with {s['workers']} workers "
                   f"({s.get('seeds_impl') or 'not run'}); ratio = img/s / seeds img/s, same preset")
        if env["device"] == "cuda":
            out.append("GB/s = (uint8 input + output dtype) bytes per image x img/s: the bytes a fused path must move")
    else:
        out.append("seeds = the seeds' way for the same model: fp32, eager, NCHW, DataLoader with "
                   f"{s['workers']} workers; vs seeds = our end-to-end train img/s / theirs")
        out.append("latency: per call (the device drained after each); serve = the serving batch")
        if env["device"] != "cuda":
            out.append(f"NVML fields empty: CUDA only (device is {env['device']}); peak mem is the process peak RSS")
        for r in result["rows"]:
            a = r.get("auto") or {}
            if a.get("img_per_s"):
                rates = ", ".join(f"{k} {v:,.0f}" for k, v in a["img_per_s"].items())
                out.append(f'precision auto ({r["model"]} b{r["batch"]}): {a["precision"]}, train.amp = "auto" on '
                           f"this CPU ({rates} img/s at batch {a['probe_batch']}, {a['chosen_by']})")
    return out


def pack_notes(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    source = next((r["peak_mem_source"] for r in rows if r.get("peak_mem_source")), "not measured")
    return ["packed = the k folds' members trained in lock-step by one stacked model, through the trainer's packed "
            "step (train.pack); img/s counts every member's images; a pack of one is the solo run",
            "sequential = the same k folds one after another: the solo run's img/s and memory (the k = 1 "
            "measurement); packed / seq > 1: packing is faster; k folds' time / 1 fold's = k / (packed / seq)",
            f"peak MB: {source}; each member holds its own loader's copy of the training images, as a fold does",
            "CUDA graphs and the OOM retry are off on both sides (packing refuses them); the schedule is constant"]


def markdown_body(result: dict[str, Any], level: str = "##") -> str:
    parts = []
    for sub, cols in tables_for(result):
        parts += [f"{level} {sub}", "", markdown_table(cols, result["rows"]), ""]
    parts += [f"- {n}" for n in notes(result)]
    return "\n".join(parts) + "\n"


BENCH_MD = "bench"  # the kind in the marker line of a bench Markdown file (ownership.MD_MARKER)


def to_markdown(result: dict[str, Any], title: str = "fastcifar bench") -> str:
    from fastcifar.ownership import MD_MARKER

    return (f"{MD_MARKER.format(kind=BENCH_MD)}\n# {title}\n\n{env_line(result['environment'])}\n\n"
            + markdown_body(result))
