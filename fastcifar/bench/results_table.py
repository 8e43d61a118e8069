"""The README's results table, built only from the committed files in bench/results/ (never typed by hand).

    python -m fastcifar.bench.results_table            # print the table
    python -m fastcifar.bench.results_table --write    # replace the block between the README's markers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastcifar.bench.suite import SEED_HOURS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _rate(v: float | None) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "–"


def _loader_figures(d: dict[str, Any]) -> str:
    ours = {r["preset"]: r for r in d["rows"] if r["loader"] == "fastcifar" and r.get("img_s")}
    parts = []
    for preset in ("crop+flip", "randaugment+erasing", "randaugment+erasing+resize224"):
        r = ours.get(preset)
        if r:
            parts.append(f"{preset}: {_rate(r['img_s'])} img/s ({r['ratio_vs_seeds']:.1f}x the seeds' loader)"
                         if r.get("ratio_vs_seeds") else f"{preset}: {_rate(r['img_s'])} img/s")
    return "; ".join(parts)


def _model_figures(d: dict[str, Any]) -> str:
    parts = []
    for r in d["rows"]:
        if not r.get("train_img_s"):
            continue
        cell = (f"{r['model']}@{r['image_size']} {r['precision']} b{r['batch']}"
                f"{' compiled' if r.get('compile') else ''}: {_rate(r['train_img_s'])} img/s end to end, "
                f"{_rate(r.get('model_only_img_s'))} model-only")
        if r.get("ratio_vs_seeds"):
            cell += f", {r['ratio_vs_seeds']:.2f}x the seeds' way"
        parts.append(cell)
    return "; ".join(parts)


def _pack_figures(d: dict[str, Any]) -> str:
    """bench pack: each packed row's ratio to the same folds one after another, in img/s and peak memory."""
    parts = []
    for r in d["rows"]:
        if not r.get("ratio") or r.get("k", 1) < 2:
            continue
        cell = (f"{r['model']} {r['precision']} b{r['batch']} k={r['k']}: {_rate(r['packed_img_s'])} img/s packed "
                f"vs {_rate(r['seq_img_s'])} sequential ({r['ratio']:.2f}x")
        cell += f", memory {r['mem_ratio']:.2f}x)" if r.get("mem_ratio") else ")"
        parts.append(cell)
    return "; ".join(parts)


def _speedrun_figures(d: dict[str, Any]) -> str:
    ours, peer = d.get("ours") or {}, d.get("airbench") or {}
    if not ours.get("acc_mean"):
        return ""
    text = (f"ours {ours['acc_mean']:.2%} in {ours['train_s_mean'] + ours['eval_s_mean']:.2f} s "
            f"(n={d.get('n')})")
    if d.get("ratio_ours_over_airbench"):
        text += (f"; airbench {peer['acc_mean']:.2%} in {peer['train_s_mean'] + peer['eval_s_mean']:.2f} s; "
                 f"time ratio ours/airbench {d['ratio_ours_over_airbench']:.2f}")
    return text


def _pooled_figures(d: dict[str, Any]) -> str:
    """bench/peer_pool.py: both sides over every pooled seed, the difference ± its standard error."""
    o, a = d["ours"], d["airbench"]
    parts = [f"{label}: ours {o[f'{k}_mean']:.2%} ± {o[f'{k}_std']:.2%}, airbench {a[f'{k}_mean']:.2%} ± "
             f"{a[f'{k}_std']:.2%}, ours - airbench {d[k]['delta'] * 100:+.2f} ± {d[k]['se'] * 100:.2f} pp"
             for k, label in (("acc", "TTA"), ("acc_no_tta", "no TTA"))]
    ratios = d["epoch_time_ratio"]["per_source"]
    epochs = f"{d['epochs']} epoch" + ("" if d["epochs"] == 1 else "s")
    return (f"{epochs}, n={o['n']} seeds; " + "; ".join(parts)
            + (f"; epoch-time ratio ours/airbench {min(ratios):.2f}–{max(ratios):.2f}" if ratios else ""))


def _records_figures(d: dict[str, Any]) -> str:
    """bench/peer_records.py: each record beside our recipe at its steps, the difference ± its standard error."""
    parts = []
    for key, c in (d.get("comparisons") or {}).items():
        name = key.split("/")[0]
        peer, ours = d["sides"].get(name), d["sides"].get(c.get("ours", ""))
        if not peer or not ours or not isinstance(c.get("steps"), list):  # a file from before these fields
            continue
        parts.append(f"{c['ours']} {ours['acc_mean']:.2%} vs {name} {peer['acc_mean']:.2%} at {c['steps'][0]} / "
                     f"{c['steps'][1]} steps (TTA {c['acc']['delta'] * 100:+.2f} ± {c['acc']['se'] * 100:.2f} pp, "
                     f"no TTA {c['acc_no_tta']['delta'] * 100:+.2f} ± {c['acc_no_tta']['se'] * 100:.2f} pp, "
                     f"n={c['n'][0]}/{c['n'][1]}), epoch-time ratio {c['epoch_time_ratio']:.2f}")
    return f"{d.get('train_images')} training images, peers {d.get('peer_precision')}; " + "; ".join(parts)


def _suite_figures(d: dict[str, Any]) -> str:
    parts = [_loader_figures(d["loader"]) if d.get("loader") else "",
             _pack_figures(d["pack"]) if d.get("pack") else "",
             _model_figures(d["model"]) if d.get("model") else ""]
    seed = d.get("seed_workload") or {}
    if seed.get("ours_img_s"):
        parts.append(f"seed workload {_rate(seed['ours_img_s'])} img/s -> {seed['ours_hours']:.1f} h for the "
                     f"seed's full run (seed: {SEED_HOURS:.0f} h on 8 V100s)")
    return "; ".join(p for p in parts if p)


def row(path: Path) -> list[str] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    env = d.get("environment") or {}
    if d.get("kind") == "fastcifar-bench-suite":
        what, figures = "suite", _suite_figures(d)
    elif d.get("what") == "loader":
        what, figures = "loader", _loader_figures(d)
    elif d.get("what") == "model":
        what, figures = "model", _model_figures(d)
    elif d.get("what") == "pack":
        what, figures = "packed k-fold", _pack_figures(d)
    elif d.get("kind") == "peer-records":
        what, figures = "records side by side" + (" (tiny)" if d.get("tiny") else ""), _records_figures(d)
    elif d.get("kind") == "peer-airbench-pooled":
        what, figures = "speedrun vs airbench, pooled", _pooled_figures(d)
    elif "airbench" in d:
        what, figures = "speedrun vs airbench", _speedrun_figures(d)
    else:
        return None
    return [str(env.get("date", "?"))[:10], env.get("device_name", "?"), what,
            f"`{env['command']}`" if env.get("command") else "–", figures or "–",
            f"[{path.name}](bench/results/{path.name})"]


def table(results: Path) -> str:
    rows = [r for r in (row(p) for p in sorted(results.glob("*.json"))) if r]
    head = ["date", "hardware", "bench", "command", "figures", "file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    if not rows:
        lines.append("| – | – | – | – | no result files committed yet | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="bench/results")
    p.add_argument("--write", nargs="?", const="README.md", metavar="README", help="update the README block")
    args = p.parse_args(argv)
    text = table(Path(args.results))
    if not args.write:
        print(text)
        return 0
    readme = Path(args.write)
    body = readme.read_text()
    if BEGIN not in body or END not in body:
        print(f"{readme}: no {BEGIN} ... {END} block to replace", file=sys.stderr)
        return 2
    head, rest = body.split(BEGIN, 1)
    from fastcifar.atomic import write_text

    write_text(readme, head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
