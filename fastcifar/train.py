"""Training one fold: the epoch loop, checkpoints, early stopping, resume and the per-epoch metrics CSV."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.atomic import write_json, write_text
from fastcifar.augment import build_eval_transform, build_train_transform
from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.device import amp_dtype, autocast
from fastcifar.errors import CheckpointError
from fastcifar.evaluate import evaluate
from fastcifar.loader import DeviceLoader, gather_images
from fastcifar.models import create_model
from fastcifar.optim import build_optimizer, build_scheduler
from fastcifar.recipe import Recipe
from fastcifar.splits import Fold, take_per_class

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "img_per_s"]


@dataclass
class Hooks:
    """Callbacks for tests and tooling: on_step(epoch, step) and on_epoch_end(epoch) after the checkpoint."""

    on_step: Callable[[int, int], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_model(recipe: Recipe, num_classes: int, image_size: int, device: torch.device,
                pretrained: bool = True) -> torch.nn.Module:
    m = recipe.model
    model = create_model(m.name, num_classes=num_classes, image_size=recipe.augment.resize or image_size,
                         width=m.width, dropout=m.dropout, pretrained=m.pretrained if pretrained else "")
    # channels-last matches the loader's NHWC batches and is the fast conv layout on CUDA and oneDNN.
    return model.to(device, memory_format=torch.channels_last)


@dataclass
class FoldData:
    train: DeviceLoader
    val: DeviceLoader
    test: DeviceLoader | None


def make_loaders(recipe: Recipe, store, fold: Fold, device: torch.device) -> FoldData:
    labels = np.concatenate([store.train_labels, store.test_labels])
    train_idx = fold.train
    if recipe.data.train_subset:
        train_idx = take_per_class(train_idx, labels, recipe.data.train_subset)
    mean, std = recipe.data.mean, recipe.data.std
    train_tf = build_train_transform(recipe.augment, mean, std)
    eval_tf = build_eval_transform(recipe.augment, mean, std)

    def loader(idx, tf, shuffle, batch):
        images = gather_images(store.train_images, store.test_images, idx)
        return DeviceLoader(images, labels[idx], batch, tf, device, shuffle=shuffle,
                            seed=recipe.train.seed * 1000 + fold.index)

    bs, ebs = recipe.train.batch_size, recipe.eval.batch_size
    same = fold.test is not None and np.array_equal(fold.test, fold.val)
    val = loader(fold.val, eval_tf, False, ebs)
    test = val if same else (loader(fold.test, eval_tf, False, ebs) if fold.test is not None else None)
    return FoldData(loader(train_idx, train_tf, True, bs), val, test)


def _clip_and_step(model, optimizer, scaler, grad_clip: float) -> None:
    if scaler is not None:
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        return
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()


def train_epoch(model, optimizer, scheduler, scaler, loader: DeviceLoader, recipe: Recipe, device, dtype,
                on_step: Callable[[int], None], progress_advance: Callable[[int], None]) -> dict[str, float]:
    """One pass over the training set; loss and accuracy accumulate on the device, read once at the end."""
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    for step, (x, y) in enumerate(loader):
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        lr = optimizer.param_groups[0]["lr"]
        _clip_and_step(model, optimizer, scaler, recipe.train.grad_clip)
        scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        progress_advance(len(y))
        on_step(step)
    return {"loss": float(loss_sum) / max(seen, 1), "acc": int(correct) / max(seen, 1), "lr": lr, "n": seen}


def _metrics_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})
    return buf.getvalue()


class FoldTrainer:
    """Owns the model, optimizer and loaders of one fold, and everything a checkpoint must capture."""

    def __init__(self, recipe: Recipe, store, fold: Fold, fold_dir: Path, device: torch.device, console):
        self.recipe, self.fold, self.dir, self.device, self.console = recipe, fold, fold_dir, device, console
        self.classes = list(store.classes)
        torch.manual_seed(recipe.train.seed * 1000 + fold.index)  # same init for a fresh and a resumed run
        self.data = make_loaders(recipe, store, fold, device)
        self.model = build_model(recipe, len(self.classes), store.train_images.shape[1], device)
        self.optimizer = build_optimizer(recipe.optim, self.model.parameters(), device)
        self.scheduler = build_scheduler(recipe.schedule, recipe.optim, self.optimizer, len(self.data.train),
                                         recipe.train.epochs)
        self.dtype = amp_dtype(device, recipe.train.amp)
        fp16_cuda = self.dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        self.state = FitState()

    # -- checkpoints -------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "classes": self.classes, "fold": self.fold.index}

    def save_last(self) -> None:
        save_checkpoint(self.dir / "checkpoints" / "last.pt", {
            **self._meta(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.data.train.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "state": self.state.as_dict()})

    def save_best(self, row: dict[str, float]) -> None:
        save_checkpoint(self.dir / "checkpoints" / "best.pt",
                        {**self._meta(), "model": self.model.state_dict(), "epoch": row["epoch"], "metrics": row})

    def try_resume(self) -> bool:
        path = self.dir / "checkpoints" / "last.pt"
        if not path.exists():
            return False
        ckpt = load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.data.train.load_state_dict(ckpt["loader"])
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt["cuda_rng"] is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
            self.state = FitState(**ckpt["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot resume from it ({str(e).splitlines()[0]})") from None
        self.console.print(f"resumed {path} after epoch {self.state.epoch}")
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def _end_epoch(self, row: dict[str, float]) -> bool:
        """Book-keeping after an epoch; returns True when early stopping fires."""
        st, tr = self.state, self.recipe.train
        st.history.append(row)
        st.epoch = row["epoch"]
        metric = row["val_acc"] if self.recipe.eval.metric == "val_acc" else -row["val_loss"]
        if st.best_metric is None or metric > st.best_metric:
            st.best_metric, st.best_epoch, st.bad_epochs = metric, st.epoch, 0
            self.save_best(row)
        else:
            st.bad_epochs += 1
        st.stopped_early = bool(tr.early_stopping_patience) and st.bad_epochs >= tr.early_stopping_patience
        write_text(self.dir / "metrics.csv", _metrics_csv(st.history))
        if st.epoch % tr.checkpoint_every == 0 or st.stopped_early or st.epoch == tr.epochs:
            self.save_last()
        return st.stopped_early

    def fit(self, hooks: Hooks, progress) -> None:
        tr = self.recipe.train
        while self.state.epoch < tr.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            task = progress.add_task(f"epoch {epoch + 1}/{tr.epochs}", total=self.data.train.num_images)
            t0 = time.perf_counter()
            on_step = (lambda s: hooks.on_step(epoch, s)) if hooks.on_step else (lambda s: None)
            stats = train_epoch(self.model, self.optimizer, self.scheduler, self.scaler, self.data.train,
                                self.recipe, self.device, self.dtype, on_step,
                                lambda n: progress.advance(task, n))
            train_time = time.perf_counter() - t0
            val = evaluate(self.model, self.data.val, self.device, self.dtype, len(self.classes))
            progress.remove_task(task)
            row = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"], "lr": stats["lr"],
                   "epoch_time_s": time.perf_counter() - t0, "img_per_s": stats["n"] / train_time}
            stop = self._end_epoch(row)
            self.console.print(
                f"fold {self.fold.index} epoch {row['epoch']:>3}/{tr.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2%}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  "
                f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s  {row['img_per_s']:,.0f} img/s")
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1)
            if stop:
                self.console.print(f"early stopping: no improvement of {self.recipe.eval.metric} for "
                                   f"{tr.early_stopping_patience} epochs (best epoch {self.state.best_epoch})")

    def finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint on validation and test, and write result.json."""
        best = load_checkpoint(self.dir / "checkpoints" / "best.pt")
        self.model.load_state_dict(best["model"])
        val = evaluate(self.model, self.data.val, self.device, self.dtype, len(self.classes))
        result: dict[str, Any] = {
            "fold": self.fold.index, "best_epoch": best["epoch"], "epochs_run": self.state.epoch,
            "stopped_early": self.state.stopped_early, "val_acc": val["acc"], "val_loss": val["loss"],
            "val_per_class_acc": val["per_class_acc"], "classes": self.classes,
            "train_time_s": sum(r["epoch_time_s"] for r in self.state.history)}
        if self.data.test is not None:
            test = val if self.data.test is self.data.val else evaluate(
                self.model, self.data.test, self.device, self.dtype, len(self.classes))
            result.update(test_acc=test["acc"], test_loss=test["loss"], test_per_class_acc=test["per_class_acc"],
                          test_confusion=test["confusion"])
        write_json(self.dir / "result.json", result)
        return result
