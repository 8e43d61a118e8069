"""compute_metrics against independent scikit-learn / numpy computations on random and edge-case predictions."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from fastcifar.metrics import compute_metrics
from fastcifar.report import FOLD_TABLE, headline


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Equal-width confidence bins over [0, 1]; L1 gap between bin accuracy and bin confidence, weighted by count."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    idx = np.clip(np.floor(conf * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def _case(seed: int, c: int, n: int = 500, kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1.5, (n, c))
    logits[np.arange(n), y] += rng.normal(1.0, 1.0, n)  # some signal, so metrics are not all near chance
    if kind == "absent_target":  # class c-1 never occurs in targets (but is still predicted sometimes)
        y[y == c - 1] = 0
    elif kind == "never_predicted":  # class 1 always loses the argmax
        logits[:, 1] = logits.min(axis=1) - 1.0
    return logits, y


CASES = [(s, 10, "random") for s in range(3)] + [(s, 3, "random") for s in range(3)] + [
    (10, 10, "absent_target"), (11, 3, "absent_target"), (12, 10, "never_predicted"), (13, 3, "never_predicted")]


@pytest.mark.parametrize("seed,c,kind", CASES)
def test_metrics_match_sklearn(seed: int, c: int, kind: str) -> None:
    logits, y = _case(seed, c, kind=kind)
    m = compute_metrics(torch.tensor(logits, dtype=torch.float32), torch.tensor(y), c)
    json.dumps(m, allow_nan=False)  # JSON-ready: python numbers and lists only
    probs = _softmax(logits.astype(np.float32).astype(np.float64))
    pred = probs.argmax(axis=1)
    labels = list(range(c))
    close = lambda a, b, tol=1e-6: a == pytest.approx(b, abs=tol)  # noqa: E731

    assert m["n"] == len(y)
    assert close(m["accuracy"], skm.accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that k >= C is a trivial score: that is the capped case
        assert close(m["top5_accuracy"], skm.top_k_accuracy_score(y, probs, k=min(5, c), labels=labels))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about ill-defined precision / recall; the values are the point
        for avg in ("micro", "macro", "weighted"):
            # macro without labels=: scikit-learn's default label set (classes in targets or predictions)
            p, r, f, _ = skm.precision_recall_fscore_support(
                y, pred, average=avg, zero_division=0, labels=None if avg == "macro" else labels)
            assert close(m["precision"][avg], p) and close(m["recall"][avg], r) and close(m["f1"][avg], f), avg
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
        balanced = skm.balanced_accuracy_score(y, pred)
    assert np.allclose(m["precision"]["per_class"], p, atol=1e-6)
    assert np.allclose(m["recall"]["per_class"], r, atol=1e-6)
    assert np.allclose(m["per_class_accuracy"], r, atol=1e-6)
    assert np.allclose(m["f1"]["per_class"], f, atol=1e-6)
    assert close(m["balanced_accuracy"], balanced)
    assert close(m["cohen_kappa"], skm.cohen_kappa_score(y, pred))
    assert close(m["log_loss"], skm.log_loss(y, probs, labels=labels))
    assert close(m["ece"], _ece(probs, y))

    cm = np.array(m["confusion"], dtype=np.float64)
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), 0.0)
    assert np.allclose(m["specificity"]["per_class"], spec, atol=1e-6)
    assert close(m["specificity"]["mean"], spec.mean())

    if kind == "absent_target":  # sklearn refuses OvR AUROC here; compare with the mean over defined classes
        present = [k for k in labels if (y == k).any()]
        want = np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in present])
    else:
        want = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
    assert close(m["auroc_macro"], want, 1e-5)


def test_perfect_predictions() -> None:
    y = torch.arange(300) % 10
    logits = torch.nn.functional.one_hot(y, 10).float() * 40.0
    m = compute_metrics(logits, y, 10)
    for key in ("accuracy", "top5_accuracy", "cohen_kappa", "balanced_accuracy", "auroc_macro"):
        assert m[key] == pytest.approx(1.0), key
    for name in ("precision", "recall", "f1"):
        assert [m[name][avg] for avg in ("micro", "macro", "weighted")] == pytest.approx([1.0] * 3)
        assert m[name]["per_class"] == pytest.approx([1.0] * 10)
    assert m["specificity"]["mean"] == pytest.approx(1.0)
    assert m["log_loss"] == pytest.approx(0.0, abs=1e-6) and m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["confusion"] == (np.eye(10, dtype=int) * 30).tolist()
    row = {k: headline({"metrics": m})[k] for k in FOLD_TABLE}  # report.md's folds table columns
    assert list(row) == ["accuracy", "precision", "recall", "specificity", "f1", "kappa", "balanced_accuracy", "auroc"]
    assert all(v == pytest.approx(1.0) for v in row.values())


def test_top_k_named_by_request_and_capped() -> None:
    logits, y = _case(3, 3)
    m = compute_metrics(torch.tensor(logits), torch.tensor(y), 3, top_k=5)
    assert m["top5_accuracy"] == 1.0  # with 3 classes every target is within the top 5
    m2 = compute_metrics(torch.tensor(logits), torch.tensor(y), 3, top_k=2)
    assert m2["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, _softmax(logits), k=2))


def test_undefined_values_are_none() -> None:
    y = torch.zeros(20, dtype=torch.int64)
    m = compute_metrics(torch.randn(20, 4), y, 4)
    assert m["auroc_macro"] is None
    json.dumps(m, allow_nan=False)
