"""What a finished fold leaves behind besides its checkpoints: the full metric set, cost figures (parameters,
inference time, peak memory) and the figures of the seeds' write-ups, all from one pass over the evaluation set.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcifar import figures as fig
from fastcifar.engine import sync
from fastcifar.evaluate import evaluate
from fastcifar.gradcam import get_layer, grad_cam

FIGURES = "figures"


def peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    """Peak memory of this process: the CUDA allocator's on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocator"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


def timed_evaluate(model, loader, device, dtype, num_classes: int, **kwargs) -> tuple[dict[str, Any], float]:
    """evaluate(keep_logits=True, **kwargs: tta, channels_last) and its wall time per image (data path and
    TTA views included, as a user would see it)."""
    sync(device)  # CUDA and MPS queue work ahead of the host: the clock brackets finished work only
    t0 = time.perf_counter()
    out = evaluate(model, loader, device, dtype, num_classes, keep_logits=True, **kwargs)
    sync(device)
    return out, (time.perf_counter() - t0) * 1000 / max(out["n"], 1)


def write_figures(fold_dir: Path, history: list[dict], final: dict[str, Any], classes: list[str], loader,
                  train_images: np.ndarray, train_labels: np.ndarray, model, stage_boundary: int | None,
                  gradcam_layer: str = "") -> list[str]:
    """Curves, confusion, samples, predictions, most-confident mistakes and Grad-CAM of one fold."""
    out = fold_dir / FIGURES
    probs = torch.softmax(final["logits"], 1).numpy()
    labels = final["targets"].numpy()
    preds = probs.argmax(1)
    spread = np.linspace(0, len(labels) - 1, min(32, len(labels))).astype(np.int64)
    images = loader.images.cpu().numpy()  # uint8 (N, H, W, 3), the evaluation set in loader order
    written = [
        fig.plot_curves(history, out / "curves.png", stage_boundary=stage_boundary),
        fig.plot_confusion(final["confusion"], classes, out / "confusion.png"),
        fig.plot_samples(train_images, train_labels, classes, out / "samples.png"),
        # Evenly spaced picks: evaluation sets are stored class by class, so the first 32 would be one class.
        fig.plot_predictions(*(a[spread] for a in (images, labels, preds, probs)), classes,
                             out / "predictions.png"),
        fig.plot_mistakes(images, labels, probs, classes, out / "mistakes.png"),
    ]
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):  # Grad-CAM needs a conv layer
        idx = _gradcam_picks(labels, preds, len(classes))
        x = loader.transform(loader.images, torch.as_tensor(idx, device=loader.images.device), None, 0)
        layer = get_layer(model, gradcam_layer) if gradcam_layer else None
        cams = grad_cam(model, x, target=None, layer=layer)
        if cams.shape[-2:] != images.shape[1:3]:  # resized inputs: bring the map back to the stored image
            cams = torch.nn.functional.interpolate(cams[:, None], size=images.shape[1:3], mode="bilinear")[:, 0]
        written.append(fig.plot_gradcam(images[idx], cams.detach().cpu().numpy(), labels[idx], preds[idx],
                                        classes, out / "gradcam.png"))
    return [str(Path(p).relative_to(fold_dir)) for p in written]


def _gradcam_picks(labels: np.ndarray, preds: np.ndarray, num_classes: int, n: int = 8) -> np.ndarray:
    """One image per class where possible (first of each class), mistakes and hits alike, n at most."""
    picks = [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes) if (labels == c).any()]
    return np.array(picks[:n] if picks else list(range(min(n, len(labels)))), dtype=np.int64)
