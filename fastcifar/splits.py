"""Train / validation / test index sets, as indices into the concatenation [store train ; store test].

official: train on the 50k, validate on the official test set (what the seed projects did), test = the same
          set.
holdout:  a stratified val_fraction of the pool is held out (seed 002: 45k / 5k), test = official test.
kfold:    stratified k folds of the pool (seed 000: the merged 60k in 5 folds); with pool = train the official
          test set stays the test set, with pool = train+test there is no untouched test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastcifar.recipe import SplitCfg


@dataclass(frozen=True)
class Fold:
    index: int  # fold number (0 for official / holdout)
    train: np.ndarray  # int64 global indices
    val: np.ndarray
    test: np.ndarray | None  # None when the test set was merged into the pool


def _stratified_chunks(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Split `pool` into k chunks with every class spread evenly (sizes differ by at most 1 per class)."""
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        for i, part in enumerate(np.array_split(members, k)):
            chunks[i].append(part)
    return [np.sort(np.concatenate(parts)) for parts in chunks]


def _holdout(labels: np.ndarray, pool: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        val.append(members[: int(round(len(members) * fraction))])
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(pool, val_idx), val_idx


def make_folds(n_train: int, labels: np.ndarray, cfg: SplitCfg) -> list[Fold]:
    """All folds of the split; `labels` covers train then test (length n_train + n_test)."""
    train = np.arange(n_train, dtype=np.int64)
    test = np.arange(n_train, len(labels), dtype=np.int64)
    if cfg.kind == "official":
        return [Fold(0, train, test, test)]
    merged = cfg.pool == "train+test"
    pool = np.arange(len(labels), dtype=np.int64) if merged else train
    held_test = None if merged else test
    if cfg.kind == "holdout":
        tr, va = _holdout(labels, pool, cfg.val_fraction, cfg.seed)
        return [Fold(0, tr, va, held_test)]
    chunks = _stratified_chunks(labels, pool, cfg.k, cfg.seed)
    return [Fold(i, np.setdiff1d(pool, chunks[i]), chunks[i], held_test) for i in range(cfg.k)]


def take_per_class(indices: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first n indices of each class (indices keep their order); used for quick subset runs."""
    keep = [indices[labels[indices] == c][:n] for c in np.unique(labels[indices])]
    return np.sort(np.concatenate(keep))
