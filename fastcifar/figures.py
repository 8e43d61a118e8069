"""The PNG figures of a fold: training curves, confusion matrices and image grids (samples, predictions, mistakes,
Grad-CAM).

Figures are built on matplotlib.figure.Figure with an Agg canvas, never through pyplot, so no global backend or
figure registry is touched (safe in worker processes and headless machines). Each PNG is rendered to memory and
then written atomically: a crash leaves the previous file or none, never a truncated image.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from .atomic import write_with

DPI = 110
CELL_TEXT_MAX = 30  # classes up to which the confusion matrix prints its numbers in the cells
SAMPLE_ROWS = 20  # classes the sample grid shows at most
GOOD, BAD = "#1a7f37", "#c62828"  # green / red titles for correct / wrong predictions


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    data = buf.getvalue()
    write_with(path, lambda f: f.write(data))
    return Path(path)


def label(name: object) -> str:
    """A class name as matplotlib should print it: "$" escaped (a pair would start mathtext, and a name such as
    "$\\foo{" then fails to parse) and unprintable characters shown as escapes."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))
    return text.replace("$", r"\$")


def _name(classes: Sequence[str], i: int) -> str:
    return label(classes[i]) if 0 <= i < len(classes) else str(i)


def _show(ax, img: np.ndarray) -> None:
    # nearest keeps 32 px images' pixels crisp instead of smearing them when upscaled.
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, cols: int, cell_w: float, cell_h: float):
    """A figure with an (rows x cols) grid of image axes; returns (fig, flat list of axes), unused cells hidden."""
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(cols * cell_w, rows * cell_h)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes


# --- curves -----------------------------------------------------------------------------------------------------


def plot_curves(history: list[dict], path: str | os.PathLike, stage_boundary: int | None = None) -> Path:
    """Loss, accuracy (%) per epoch and the learning rate (per step where the history has "lr_steps"), side by
    side; a dashed "stage 2" line at stage_boundary."""
    fig = new_figure(13.5, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ep = [r["epoch"] for r in history]
    col = lambda key: [float(r[key]) for r in history]  # noqa: E731
    marker = "o" if len(history) <= 30 else None  # markers show single points on short runs, clutter on long ones
    validated = [r for r in history if r.get("val_acc") is not None]  # eval.every: the epochs validated
    val_ep, val_marker = [r["epoch"] for r in validated], "o" if len(validated) <= 30 else None
    ax_loss.plot(ep, col("train_loss"), marker=marker, ms=3, label="train")
    ax_loss.plot(val_ep, [float(r["val_loss"]) for r in validated], marker=val_marker, ms=3, label="val")
    ax_acc.plot(ep, [100 * v for v in col("train_acc")], marker=marker, ms=3, label="train")
    ax_acc.plot(val_ep, [100 * float(r["val_acc"]) for r in validated], marker=val_marker, ms=3, label="val")
    # the lr inside each epoch where the run recorded it (a warm-up or a OneCycle rise shows), else one an epoch
    steps = [p for r in history for p in r.get("lr_steps") or []]
    lr_x, lrs = ([float(x) for x, _ in steps], [float(v) for _, v in steps]) if steps else (ep, col("lr"))
    ax_lr.plot(lr_x, lrs, color="tab:purple", marker=marker if not steps else None, ms=3,
               label="lr per step" if steps else "lr")
    if lrs and min(lrs) > 0 and max(lrs) / min(lrs) > 10:  # a log axis only helps when lr spans decades
        ax_lr.set_yscale("log")
    else:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    for ax, title, ylabel in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "accuracy", "accuracy (%)"),
                              (ax_lr, "learning rate", "lr")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(ep) <= 12:
            ax.set_xticks(ep)  # short runs: one tick per epoch
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if ep:
            ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)  # a one-epoch run still gets a sensible axis
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if stage_boundary is not None:
            # Between the last head-only epoch and the first epoch of stage 2.
            ax.axvline(stage_boundary + 0.5, color="0.35", linestyle="--", linewidth=1.2, label="stage 2")
        ax.legend(fontsize=8)
    if steps:  # step s of epoch e sits at e - 1 + (s + 1) / steps: the first epoch starts at 0
        ax_lr.set_xlim(0.0, max(lr_x) + 0.5)
    return save_png(fig, path)


# --- confusion --------------------------------------------------------------------------------------------------


def _heatmap(fig, ax, values: np.ndarray, text: list[list[str]], classes: Sequence[str], title: str,
             vmin: float, vmax: float, integer: bool = False, unit: str = "") -> None:
    im = ax.imshow(values, cmap="Blues", vmin=vmin, vmax=vmax)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    if integer:  # counts: no "2.5 images" ticks
        from matplotlib.ticker import MaxNLocator

        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    k = len(classes)
    ticks = list(range(k))
    tick_size = 9 if k <= 20 else max(3.0, 300 / k)  # 100 classes: 3 pt names, each still under its own row
    ax.set_xticks(ticks, [label(c) for c in classes], rotation=45 if k <= 20 else 90, ha="right",
                  rotation_mode="anchor", fontsize=tick_size)
    ax.set_yticks(ticks, [label(c) for c in classes], fontsize=tick_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k > CELL_TEXT_MAX:  # beyond ~30 classes numbers in the cells are unreadable; the colour carries them
        return
    size = 9 if k <= 10 else max(4, 90 // k)
    mid = vmin + 0.5 * (vmax - vmin)
    for i in range(k):
        for j in range(k):
            # white text on dark cells, black on light ones, so every number stays legible
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=size,
                    color="white" if values[i, j] > mid else "black")


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: str | os.PathLike) -> Path:
    """Counts and row-normalised (%) confusion heatmaps side by side; rows = true class, columns = predicted."""
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)  # empty row -> 0, not NaN
    side = min(max(4.5, 0.55 * len(classes) + 1.5), 16.0)  # 100 classes: 16 in, not 56
    fig = new_figure(2 * side + 1.5, side)
    ax_n, ax_p = fig.subplots(1, 2)
    _heatmap(fig, ax_n, cm, [[str(v) for v in r] for r in cm.tolist()], classes, "counts", 0, max(int(cm.max()), 1),
             integer=True, unit="images")
    pct = 100 * norm  # cells and colour bar in the same unit: % of the true class
    _heatmap(fig, ax_p, pct, [[f"{v:.0f}" for v in r] for r in pct.tolist()], classes,
             "row-normalised (% of true class)", 0.0, 100.0, unit="% of true class")
    return save_png(fig, path)


# --- image grids ------------------------------------------------------------------------------------------------


def plot_samples(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str | os.PathLike,
                 per_class: int = 8, seed: int = 0) -> Path:
    """One row per class (name at the left) of per_class random images of that class; with more than
    SAMPLE_ROWS classes, that many classes evenly spread over the list (the title says how many of all)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    shown = np.unique(np.linspace(0, len(classes) - 1, min(len(classes), SAMPLE_ROWS)).round().astype(int))
    k = len(shown)
    fig = new_figure(1.2 + per_class * 0.9, k * 0.9 + (0.4 if k < len(classes) else 0))
    if k < len(classes):
        fig.suptitle(f"{k} of {len(classes)} classes")
    axes = fig.subplots(k, per_class, squeeze=False)
    for row, c in enumerate(shown):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else idx
        for j, ax in enumerate(axes[row]):
            if j < len(pick):
                _show(ax, images[pick[j]])
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[row][0].set_ylabel(_name(classes, c), rotation=0, ha="right", va="center", fontsize=10)
    return save_png(fig, path)


def _title(classes: Sequence[str], y: int, p: int, prob: float) -> str:
    return f"{_name(classes, y)} → {_name(classes, p)} ({100 * prob:.0f}%)"


def plot_predictions(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str], path: str | os.PathLike, n: int = 32) -> Path:
    """The first n images titled "true → pred (p%)", green when right and red when wrong."""
    n = min(n, len(images))
    fig, axes = _grid(max(n, 1), 8, 1.9, 1.9)
    fig.suptitle("true class → predicted class (its probability); green: right, red: wrong", fontsize=10)
    for i in range(n):
        y, p = int(labels[i]), int(preds[i])
        _show(axes[i], images[i])
        axes[i].set_title(_title(classes, y, p, float(probs[i][p])), fontsize=7.5, color=GOOD if y == p else BAD)
    if n == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=12)
    return save_png(fig, path)


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                  path: str | os.PathLike, n: int = 16) -> Path:
    """The n most confident wrong predictions, most confident first, titled "true → pred (p%)"."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    preds = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    wrong = np.flatnonzero(preds != labels)
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    if len(order) == 0:
        fig = new_figure(4.0, 1.6)
        fig.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=16)
        return save_png(fig, path)
    fig, axes = _grid(len(order), 8, 1.9, 1.9)
    fig.suptitle("the most confident mistakes: true class → predicted class (its probability)", fontsize=10)
    for ax, i in zip(axes, order):
        _show(ax, images[i])
        ax.set_title(_title(classes, int(labels[i]), int(preds[i]), float(conf[i])), fontsize=7.5, color=BAD)
    return save_png(fig, path)


def plot_gradcam(images: np.ndarray, cams: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                 classes: Sequence[str], path: str | os.PathLike) -> Path:
    """Per image two cells: the image (titled true → pred) and the image with its Grad-CAM overlaid (jet, 45%)."""
    n = len(images)
    pairs_per_row = 4
    fig, axes = _grid(max(2 * n, 2), 2 * min(pairs_per_row, max(n, 1)), 1.6, 1.75)
    for i in range(n):
        y, p = int(labels[i]), int(preds[i])
        ax_img, ax_cam = axes[2 * i], axes[2 * i + 1]
        _show(ax_img, images[i])
        ax_img.set_title(f"{_name(classes, y)} → {_name(classes, p)}", fontsize=7.5, color=GOOD if y == p else BAD)
        _show(ax_cam, images[i])
        ax_cam.imshow(np.asarray(cams[i], dtype=np.float32), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0,
                      interpolation="bilinear")
        ax_cam.set_title("Grad-CAM", fontsize=7.5)
    return save_png(fig, path)
