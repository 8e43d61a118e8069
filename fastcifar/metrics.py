"""Classification metrics for one evaluation: a JSON-ready dict computed with torchmetrics' functional API.

Conventions for classes that are missing (they follow scikit-learn, and tests/test_metrics.py checks them against it):

* zero_division = 0: a class never predicted has precision 0, a class absent from the targets has recall 0,
  and their F1 is 0; specificity with no negatives is 0.
* macro precision / recall / F1 average over the classes that occur in the targets or the predictions
  (scikit-learn's default label set, and torchmetrics' macro rule): a class seen in neither is reported as 0 in
  the per-class lists but left out of the macro mean. Weighted averages weight by target support.
* balanced_accuracy is the mean recall over classes present in the targets (scikit-learn's
  balanced_accuracy_score), so a predicted-but-absent class does not drag it down.
* auroc_macro is the one-vs-rest AUROC averaged over classes where it is defined (the class has both positives
  and negatives among the targets); None when no class qualifies. Other undefined values (e.g. kappa with a
  single class everywhere) are None too, since NaN is not valid JSON.
* specificity mean is the plain mean over all num_classes classes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmf

ECE_BINS = 15


def _num(x: torch.Tensor | float) -> float | None:
    """A python float, or None where the value is undefined (JSON has no NaN)."""
    v = float(x)
    return v if math.isfinite(v) else None


def _floats(t: torch.Tensor) -> list[float | None]:
    return [_num(v) for v in t.reshape(-1).tolist()]


def _prf(probs: torch.Tensor, targets: torch.Tensor, c: int) -> dict[str, dict[str, Any]]:
    """precision / recall / f1, each with micro, macro, weighted and per_class (zero_division=0)."""
    out: dict[str, dict[str, Any]] = {}
    fns = {"precision": tmf.multiclass_precision, "recall": tmf.multiclass_recall, "f1": tmf.multiclass_f1_score}
    for name, fn in fns.items():
        # torchmetrics defaults to average="macro"; every average is spelled out so none is picked by accident.
        row: dict[str, Any] = {avg: _num(fn(probs, targets, c, average=avg, zero_division=0))
                               for avg in ("micro", "macro", "weighted")}
        row["per_class"] = _floats(fn(probs, targets, c, average="none", zero_division=0))
        out[name] = row
    return out


def _auroc_macro(probs: torch.Tensor, targets: torch.Tensor, c: int) -> float | None:
    """One-vs-rest macro AUROC over the classes where it is defined (both positives and negatives present)."""
    support = torch.bincount(targets, minlength=c)
    defined = (support > 0) & (support < len(targets))
    if not bool(defined.any()):
        return None
    with warnings.catch_warnings():
        # torchmetrics warns about the classes without positives; they are excluded just below.
        warnings.filterwarnings("ignore", message="No positive samples", category=UserWarning)
        per_class = tmf.multiclass_auroc(probs, targets, c, average="none", thresholds=None)
    return _num(per_class[defined].mean())


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, top_k: int = 5) -> dict:
    """All evaluation metrics of (N, C) logits against (N,) int targets; see the module docstring for conventions.

    The top-k key is named after the requested k ("top5_accuracy"), while the computation caps k at C: with fewer
    than k classes every target is inside the top k, which is what top-k accuracy means there.
    """
    c = int(num_classes)
    logits = logits.detach().to("cpu", torch.float64)
    targets = targets.detach().to("cpu", torch.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape != (len(targets), c):
        raise ValueError(f"compute_metrics: logits must be (N, {c}) with N = {len(targets)}, got {tuple(logits.shape)}")
    # Probabilities, not logits, go to torchmetrics: it only applies softmax when values fall outside [0, 1].
    probs = torch.softmax(logits, dim=1)
    preds = probs.argmax(dim=1)
    k = max(1, min(int(top_k), c))

    confusion = tmf.multiclass_confusion_matrix(preds, targets, c)  # rows = true, cols = predicted
    support = confusion.sum(dim=1)
    recall_pc = torch.where(support > 0, confusion.diag() / support.clamp(min=1), torch.zeros(c, dtype=torch.float64))
    present = support > 0
    spec = tmf.multiclass_specificity(preds, targets, c, average="none")

    m: dict[str, Any] = {
        "n": len(targets),
        "accuracy": _num(tmf.multiclass_accuracy(preds, targets, c, average="micro")),
        f"top{int(top_k)}_accuracy": _num(tmf.multiclass_accuracy(probs, targets, c, average="micro", top_k=k)),
        "per_class_accuracy": _floats(recall_pc),
    }
    m.update(_prf(probs, targets, c))
    m["specificity"] = {"per_class": _floats(spec), "mean": _num(spec.mean())}
    m["cohen_kappa"] = _num(tmf.multiclass_cohen_kappa(preds, targets, c))
    m["balanced_accuracy"] = _num(recall_pc[present].mean()) if bool(present.any()) else None
    m["auroc_macro"] = _auroc_macro(probs, targets, c)
    m["confusion"] = [[int(v) for v in row] for row in confusion.tolist()]
    m["log_loss"] = _num(F.cross_entropy(logits, targets)) if len(targets) else None
    m["ece"] = _num(tmf.multiclass_calibration_error(probs, targets, c, n_bins=ECE_BINS, norm="l1"))
    return m
