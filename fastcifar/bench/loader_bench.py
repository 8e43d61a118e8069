"""`fastcifar bench loader`: images/s of every input pipeline x augmentation preset on one device, in one run.

Rows: "fastcifar" (the device loader: resident uint8 store, batched augmentation, bf16 output on CUDA), "seeds"
(the seed projects' way: PIL + per-image v2 transforms in a DataLoader with workers, batches copied to the
device), and "dali" / "ffcv" when their backends and libraries are installed (otherwise the row says why). A batch
counts as delivered when it is on the device, ready for the model.
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from fastcifar.backends import BACKENDS, fitted_workers
from fastcifar.bench.env import bench_environment, peak_hbm_gbs
from fastcifar.bench.presets import PRESETS, missing_ops
from fastcifar.bench.seed_projects import seed_project_loader
from fastcifar.bench.timing import cycle, measure_rate, quiet_workers
from fastcifar.data import store_stats
from fastcifar.errors import first_line
from fastcifar.recipe import AugmentCfg

if TYPE_CHECKING:
    from fastcifar.data.store import Store

LOADERS = ("fastcifar", "seeds", "dali", "ffcv")


def _out_dtype(device: torch.device) -> torch.dtype:
    # On CUDA training casts in the normalise step to the autocast dtype: half the bytes for the first conv.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _timed(make: Callable[[], Any], device: torch.device, seconds: float, warmup: int, repeats: int,
           warmup_cap_s: float | None) -> dict[str, Any]:
    """Build a loader, time it, and free it (DataLoader workers shut down before the next row starts)."""
    loader = make()
    batches = cycle(loader)
    shapes: dict[str, Any] = {}

    def step() -> int:
        x, y = next(batches)
        shapes.update(shape=list(x.shape[1:]), dtype=str(x.dtype).replace("torch.", ""))
        return len(y)

    try:
        rate = measure_rate(step, device, seconds=seconds, repeats=repeats, warmup=warmup,
                            warmup_cap_s=warmup_cap_s)
    finally:
        batches.close()
        del batches, loader
        gc.collect()
    return {**rate.fields("img_s"), "warmup_s": rate.warmup_s, **shapes}


def _bandwidth(row: dict[str, Any], device: torch.device, in_bytes: int) -> dict[str, Any]:
    """Bytes a fused path must move per image (uint8 in + output out) x img/s, against the HBM peak."""
    if device.type != "cuda" or "shape" not in row:
        return {"bytes_per_img": None, "gb_s": None, "hbm_peak_gb_s": None, "hbm_frac": None}
    out_bytes = int(np.prod(row["shape"])) * torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
    per_img = in_bytes + out_bytes
    gbs = per_img * row["img_s"] / 1e9
    peak = peak_hbm_gbs(torch.cuda.get_device_name(device))
    return {"bytes_per_img": per_img, "gb_s": gbs, "hbm_peak_gb_s": peak, "hbm_frac": gbs / peak if peak else None}


def _backend_maker(kind: str, images, labels, batch: int, cfg: AugmentCfg, mean, std, device, workers: int,
                   shared: dict):
    """(maker, None) for an installed DALI / FFCV backend, else (None, the one-line reason). `shared` keeps what
    every preset reuses: FFCV's .beton of the rows, written once per bench run."""
    backend = BACKENDS[kind]
    try:
        if importlib.util.find_spec(backend.library) is None:
            return None, f"n/a ({backend.library} not installed: pip install 'fastcifar[{kind}]')"
    except (ImportError, ValueError) as e:
        return None, f"n/a ({first_line(e)})"
    workers = fitted_workers(workers, kind, log=lambda _: None)  # the settings record what was asked
    extra: dict[str, Any] = dict(train=True, workers=workers, seed=0, device=device)
    if kind == "ffcv":
        extra.update(beton=_shared_beton(shared, images, labels, workers), indices=np.arange(len(labels)))
    return (lambda: backend.make(images, labels, batch, cfg, mean, std, **extra)), None


def _shared_beton(shared: dict, images, labels, workers: int) -> Path:
    """The bench's one .beton of the store's rows, in a temporary folder that run_loader_bench removes."""
    if "beton" not in shared:
        from fastcifar.backends.ffcv import write_rows

        shared["tmp"] = tempfile.TemporaryDirectory(prefix="fastcifar-bench-ffcv-")
        shared["beton"] = Path(shared["tmp"].name) / "rows.beton"
        write_rows(shared["beton"], lambda i: images[i], np.asarray(labels), workers)
    return shared["beton"]


def _row(loader: str, preset: str, batch: int, make, reason: str | None, device, settings, in_bytes) -> dict:
    row: dict[str, Any] = {"loader": loader, "preset": preset, "batch": batch, "img_s": None, "note": reason or ""}
    if make is None:
        return row
    try:
        row.update(_timed(make, device, settings["seconds"], settings["warmup"], settings["repeats"],
                          settings["seconds"]))
    except Exception as e:  # a pipeline that fails is a row that says so; the other rows still run
        row["note"] = f"error: {first_line(e)}"
    row.update(_bandwidth(row, device, in_bytes) if row["img_s"] else {})
    return row


def run_loader_bench(store: Store, device: torch.device, *, batch: int = 512, seconds: float = 3.0, repeats: int = 3,
                     warmup: int = 3, workers: int = 4, presets: list[str] | None = None,
                     loaders: tuple[str, ...] = LOADERS, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every loader x preset; returns the JSON-ready result (environment, settings, rows)."""
    images, labels = store.train_images, store.train_labels
    batch = min(batch, len(labels))  # a training loader drops the ragged batch: keep one full batch possible
    stats = store_stats(store)  # the normalisation a run on this store uses (data.mean / data.std = "auto")
    mean, std = tuple(stats["mean"]), tuple(stats["std"])
    settings = {"batch": batch, "seconds": seconds, "repeats": repeats, "warmup": warmup, "workers": workers,
                "store": str(store.path), "images": int(len(labels))}
    in_bytes = int(np.prod(images.shape[1:]))
    rows, seeds_impl, shared = [], None, {}
    try:
        _all_rows(rows, shared, presets, loaders, images, labels, batch, mean, std, device, workers, settings,
                  in_bytes, log)
    finally:
        if "tmp" in shared:
            shared["tmp"].cleanup()
    seeds_impl = shared.get("seeds_impl")
    _ratios(rows)
    settings["seeds_impl"] = seeds_impl
    return {"kind": "fastcifar-bench", "what": "loader", "version": 1, "environment": bench_environment(device),
            "settings": settings, "rows": rows}


def _all_rows(rows, shared, presets, loaders, images, labels, batch, mean, std, device, workers, settings, in_bytes,
              log) -> None:
    warmup = settings["warmup"]
    for name in presets or list(PRESETS):
        cfg = PRESETS[name]
        for loader in loaders:
            t0 = time.perf_counter()
            if loader == "fastcifar":
                make, reason = _fastcifar_maker(images, labels, batch, cfg, mean, std, device)
            elif loader == "seeds":
                def make(cfg=cfg):
                    built, shared["seeds_impl"] = seed_project_loader(images, labels, batch, cfg, mean, std,
                                                                      workers=workers, seed=0, device=device)
                    return built
                reason = None
            else:
                make, reason = _backend_maker(loader, images, labels, batch, cfg, mean, std, device, workers, shared)
            # The seed projects' warm-up starts the workers and drains their first prefetch (2 batches per worker
            # queued ahead), so the timed repeats see the steady state; capped at `seconds` of wall time.
            s = dict(settings, warmup=max(warmup, 2 * workers + 1) if loader == "seeds" else warmup)
            with quiet_workers():
                row = _row(loader, name, batch, make, reason, device, s, in_bytes)
            rows.append(row)
            shown = f"{row['img_s']:,.0f} img/s" if row["img_s"] else row["note"]
            log(f"loader {loader:<9} {name:<30} {shown}  ({time.perf_counter() - t0:.1f} s)")


def _fastcifar_maker(images, labels, batch, cfg: AugmentCfg, mean, std, device):
    reason = missing_ops(cfg)
    if reason:
        return None, reason
    from fastcifar.augment import build_train_transform
    from fastcifar.loader import DeviceLoader

    tf = build_train_transform(cfg, mean, std, _out_dtype(device))
    return (lambda: DeviceLoader(images, labels, batch, tf, device, shuffle=True, seed=0)), None


def _ratios(rows: list[dict[str, Any]]) -> None:
    """ratio = this loader's img/s / the seed projects' img/s for the same preset (None where either is missing)."""
    theirs = {r["preset"]: r["img_s"] for r in rows if r["loader"] == "seeds"}
    for r in rows:
        base = theirs.get(r["preset"])
        r["ratio_vs_seeds"] = r["img_s"] / base if r["img_s"] and base else None
