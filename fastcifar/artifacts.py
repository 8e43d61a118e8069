"""What a finished fold leaves behind besides its checkpoints: its best.pt evaluated once on validation and test
(the full metric set), cost figures (parameters, inference time, peak memory), result.json, and the figures of
the seed projects' write-ups, all from one pass over the evaluation set.

    result = finish_fold(run, state)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from fastcifar import figures as fig
from fastcifar.atomic import write_json
from fastcifar.checkpoint import load_checkpoint
from fastcifar.engine import sync
from fastcifar.errors import first_line
from fastcifar.evaluate import evaluate
from fastcifar.fold_data import eval_counts
from fastcifar.fold_run import FoldRun
from fastcifar.gradcam import get_layer, grad_cam
from fastcifar.metrics import compute_metrics
from fastcifar.precision import precision_name
from fastcifar.runfiles import FIGURE_FILES, FIGURES_DIR, checkpoint_path
from fastcifar.state import TrainState

def finish_fold(run: FoldRun, state: TrainState) -> dict[str, Any]:
    """Evaluate the best checkpoint on validation and test: full metrics, costs, figures -> result.json."""
    best = load_checkpoint(checkpoint_path(run.dir, "best"))
    # Into the module validation ran on (the EMA copy when on): its compiled eval graph is reused, so no
    # compile time lands in inference_ms_per_image.
    plain = run.engine.ema.module if run.engine.ema is not None else run.model
    plain.load_state_dict(best["model"])
    net, n_cls, kw = run.engine.eval_net, len(run.classes), run.eval_kwargs
    val, ms = timed_evaluate(net, run.data.val, run.device, run.dtype, n_cls, **kw)
    result: dict[str, Any] = {
        "fold": run.fold.index, "best_epoch": best["epoch"], "epochs_run": state.epoch,
        "stopped_early": state.stopped_early, "val_acc": val["acc"], "val_loss": val["loss"],
        "val_per_class_acc": val["per_class_acc"], "classes": run.classes,
        "train_time_s": sum(r["epoch_time_s"] for r in state.history),
        "params": sum(p.numel() for p in run.model.parameters()),
        "stage_boundary": run.recipe.finetune.head_epochs or None, **eval_counts(run.fold, run.data)}
    final, split, final_loader = val, "val", run.data.val
    if run.data.test is not None:
        if run.data.test is not run.data.val:
            result["val_metrics"] = compute_metrics(val["logits"], val["targets"], n_cls)
            final, ms = timed_evaluate(net, run.data.test, run.device, run.dtype, n_cls, **kw)
        result.update(test_acc=final["acc"], test_loss=final["loss"], test_per_class_acc=final["per_class_acc"],
                      test_confusion=final["confusion"])
        split, final_loader = "test", run.data.test
    result["metrics"] = {"split": split, **compute_metrics(final["logits"], final["targets"], n_cls)}
    # best.pt competed on the validation set: numbers on that same set (official split, merged k-fold) flatter it
    # unless the last validated epoch won (its weights never depended on that set)
    validated = [int(r["epoch"]) for r in state.history if r["val_acc"] is not None]
    result["selection"] = {"validations": len(validated), "on_reported_set": final is val,
                           "last_validated_epoch": max(validated, default=None)}
    result["inference_ms_per_image"] = ms
    result["peak_memory_mb"], result["peak_memory_kind"] = peak_memory_mb(run.device)
    result["compile_time_s"] = state.compile_time_s  # warm-up steps, kept out of img_per_s
    if "tta_selection" in final:  # selective TTA: how many of the reported set got the views, at what threshold
        result["tta_selection"] = final["tta_selection"]
    result["engine"] = {**run.engine.summary(run.step.optimizer), "tta": run.recipe.eval.tta,
                        "tta_fraction": run.recipe.eval.tta_fraction,
                        "channels_last": run.recipe.train.channels_last,
                        "precision": run.precision or {"precision": precision_name(run.dtype), "chosen_by": "recipe"}}
    write_json(run.dir / "result.json", result)  # before the figures: a figure can never cost the result
    if run.recipe.eval.figures:
        _figures(run, state, result, final, final_loader, plain)
    run.tb.finish(run.recipe, result, run.dir)
    return result


def _figures(run: FoldRun, state: TrainState, result: dict[str, Any], final, loader, model) -> None:
    train = run.data.train
    try:
        result["figures"] = write_figures(
            run.dir, state.history, final, run.classes, loader, train.images.cpu().numpy(),
            train.labels.cpu().numpy(), model, run.recipe.finetune.head_epochs or None,
            run.recipe.eval.gradcam_layer)
    except Exception as e:  # noqa: BLE001 - plotting libraries fail in many ways; the fold is done
        result["figures_error"] = first_line(e)[:200]
        run.say(f"[yellow]fold {run.fold.index}: figures not written ({escape(result['figures_error'])}); the "
                "model and result.json are kept[/yellow]")
    write_json(run.dir / "result.json", result)


# The process's peak resident set before the last reset_peak_rss: Linux forgets it on a reset (getrusage's maxrss
# follows VmHWM down), and peak_memory_mb stays the peak since the process started.
_peak_before_reset_mb = 0.0


def peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    """Peak memory of this process: the CUDA allocator's on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocator"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max(rss / (2**20 if sys.platform == "darwin" else 2**10), _peak_before_reset_mb), "process peak RSS"


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> float | None:
    """Start a new peak-resident-set window (Linux 4.0+: writing 5 to /proc/self/clear_refs sets VmHWM to the
    current RSS); returns the current RSS in MB, None where the window cannot be reset. Freed heap memory is
    handed back to the system first (glibc malloc_trim), so a window starts from what is really in use."""
    global _peak_before_reset_mb
    before = _status_mb("VmHWM")
    if before is None:
        return None
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the window may then start above what is in use
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    _peak_before_reset_mb = max(_peak_before_reset_mb, before)
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """The process's peak resident set since the last reset_peak_rss (VmHWM), in MB; None off Linux."""
    return _status_mb("VmHWM")


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
    path = {name: fold_dir / FIGURES_DIR / file for name, file in FIGURE_FILES.items()}
    probs = torch.softmax(final["logits"], 1).numpy()
    labels = final["targets"].numpy()
    preds = probs.argmax(1)
    spread = np.linspace(0, len(labels) - 1, min(32, len(labels))).astype(np.int64)
    images = loader.images.cpu().numpy()  # uint8 (N, H, W, 3), the evaluation set in loader order
    written = [
        fig.plot_curves(history, path["curves"], stage_boundary=stage_boundary),
        fig.plot_confusion(final["confusion"], classes, path["confusion"]),
        fig.plot_samples(train_images, train_labels, classes, path["samples"]),
        # Evenly spaced picks: evaluation sets are stored class by class, so the first 32 would be one class.
        fig.plot_predictions(*(a[spread] for a in (images, labels, preds, probs)), classes,
                             path["predictions"]),
        fig.plot_mistakes(images, labels, probs, classes, path["mistakes"]),
    ]
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):  # Grad-CAM needs a conv layer
        idx = _gradcam_picks(labels, preds, len(classes))
        x = loader.transform(loader.images, torch.as_tensor(idx, device=loader.images.device), None, 0)
        layer = get_layer(model, gradcam_layer) if gradcam_layer else None
        cams = grad_cam(model, x, target=None, layer=layer)
        if cams.shape[-2:] != images.shape[1:3]:  # resized inputs: bring the map back to the stored image
            cams = torch.nn.functional.interpolate(cams[:, None], size=images.shape[1:3], mode="bilinear")[:, 0]
        written.append(fig.plot_gradcam(images[idx], cams.detach().cpu().numpy(), labels[idx], preds[idx],
                                        classes, path["gradcam"]))
    return [str(Path(p).relative_to(fold_dir)) for p in written]


def _gradcam_picks(labels: np.ndarray, preds: np.ndarray, num_classes: int, n: int = 8) -> np.ndarray:
    """One image per class where possible (first of each class), mistakes and hits alike, n at most."""
    picks = [int(np.flatnonzero(labels == c)[0]) for c in range(num_classes) if (labels == c).any()]
    return np.array(picks[:n] if picks else list(range(min(n, len(labels)))), dtype=np.int64)
