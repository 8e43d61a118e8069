"""Training one fold: the epoch loop, checkpoints, early stopping, resume and the per-epoch metrics CSV."""

from __future__ import annotations

import csv
import io
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastcifar.artifacts import peak_memory_mb, timed_evaluate, write_figures
from fastcifar.atomic import write_json, write_text
from fastcifar.augment import build_eval_transform, build_mixer, build_train_transform
from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.device import recipe_amp_dtype
from fastcifar.engine import StepClock, build_engine, images_per_second, sync
from fastcifar.errors import CheckpointError, first_line
from fastcifar.evaluate import evaluate
from fastcifar.lifecycle import Interrupted
from fastcifar.loader import DeviceLoader, gather_images
from fastcifar.metrics import compute_metrics
from fastcifar.models import create_model
from fastcifar.optim import build_optimizer, build_scheduler
from fastcifar.recipe import Recipe, ScheduleCfg
from fastcifar.splits import Fold, take_per_class
from fastcifar.step import EpochTotals, NonFiniteError, NonFiniteStep, StepRunner

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "img_per_s",
              "skipped_steps"]


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
    accum_steps: int = 1  # micro-batches per batch (raised by an out-of-memory retry)
    compile_time_s: float = 0.0  # warm-up (compile / CUDA-graph capture) wall time, summed over resumes

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_model(recipe: Recipe, num_classes: int, image_size: int, device: torch.device,
                pretrained: bool = True) -> torch.nn.Module:
    m = recipe.model
    model = create_model(m.name, num_classes=num_classes, image_size=recipe.augment.resize or image_size,
                         width=m.width, dropout=m.dropout, pretrained=m.pretrained if pretrained else "")
    # channels-last matches the loader's NHWC batches and is the fast conv layout on CUDA and oneDNN.
    return model.to(device, memory_format=torch.channels_last if recipe.train.channels_last else
                    torch.contiguous_format)


def classifier_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The head: parameters of the last nn.Linear (fc of the ResNets, classifier.1 of EfficientNet, ...)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


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
    # On CUDA the batch is cast to the autocast dtype in the normalise step: half the bytes for the first conv.
    dtype = recipe_amp_dtype(recipe.train, device) if device.type == "cuda" else None
    train_tf = build_train_transform(recipe.augment, mean, std, dtype or torch.float32)
    eval_tf = build_eval_transform(recipe.augment, mean, std, dtype or torch.float32)
    mixer = build_mixer(recipe.augment, len(store.classes))

    def loader(idx, tf, shuffle, batch, mix=None):
        images = gather_images(store.train_images, store.test_images, idx)
        return DeviceLoader(images, labels[idx], batch, tf, device, shuffle=shuffle,
                            seed=recipe.train.seed * 1000 + fold.index, mixer=mix)

    bs, ebs = recipe.train.batch_size, recipe.eval.batch_size
    same = fold.test is not None and np.array_equal(fold.test, fold.val)
    val = loader(fold.val, eval_tf, False, ebs)
    test = val if same else (loader(fold.test, eval_tf, False, ebs) if fold.test is not None else None)
    if recipe.train.loader != "device":  # torchvision / DALI / FFCV train; evaluation stays on the device loader
        from fastcifar.backends import make_loader

        train = make_loader(recipe, store, train_idx, labels, device, seed=recipe.train.seed * 1000 + fold.index)
        return FoldData(train, val, test)
    return FoldData(loader(train_idx, train_tf, True, bs, mixer), val, test)


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
        self.image_size = int(store.train_images.shape[1])  # stored size; predict resizes inputs to it
        torch.manual_seed(recipe.train.seed * 1000 + fold.index)  # same init for a fresh and a resumed run
        self.data = make_loaders(recipe, store, fold, device)
        self.model = build_model(recipe, len(self.classes), self.image_size, device)
        if hasattr(self.model, "init_whitening"):  # speedrun_net: its frozen first conv whitens training patches
            self.model.init_whitening(self.data.train.images, recipe.data.mean, recipe.data.std)
        self.dtype = recipe_amp_dtype(recipe.train, device)
        fp16_cuda = self.dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        # The engine wraps the model for the step (compile / CUDA graphs) and validation (EMA); self.model stays
        # the plain module, so checkpoints never carry torch.compile's "_orig_mod." prefix.
        self.engine = build_engine(self.model, recipe, device, self.dtype, console)
        self.runner = StepRunner(self.engine.net, None, None, self.scaler, recipe, device, self.dtype, console)
        self.runner.ema, self.runner.prepare = self.engine.ema, self.engine.prepare
        self._warmup_left = self.engine.plan.warmup_steps  # steps still timed as warm-up (engine.StepClock)
        self.stage_boundary = recipe.finetune.head_epochs or None
        self._set_stage(1 if self.stage_boundary else 2)
        self.state = FitState()
        self.partial: EpochTotals | None = None  # the interrupted epoch's totals, after a mid-epoch resume

    def _set_stage(self, stage: int) -> None:
        """Stage 1 trains only the classifier head at finetune.head_lr; stage 2 trains everything with the
        recipe's optimizer and schedule over the remaining epochs (the whole run when there is no stage 1)."""
        r, steps = self.recipe, len(self.data.train)
        head = set(classifier_parameters(self.model)) if stage == 1 else None
        for p in self.model.parameters():
            p.requires_grad_(head is None or p in head)
        if stage == 1:
            self.optimizer = build_optimizer(replace(r.optim, lr=r.finetune.head_lr), list(head), self.device)
            self.scheduler = build_scheduler(ScheduleCfg(name="constant"), r.optim, self.optimizer, steps,
                                             r.finetune.head_epochs)
        else:
            self.optimizer = build_optimizer(r.optim, self.model.parameters(), self.device)
            self.scheduler = build_scheduler(r.schedule, r.optim, self.optimizer, steps,
                                             r.train.epochs - r.finetune.head_epochs)
        self.stage = stage
        self.runner.optimizer, self.runner.scheduler = self.optimizer, self.scheduler

    # -- checkpoints -------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "classes": self.classes, "fold": self.fold.index,
                "image_size": self.image_size}

    @property
    def last_path(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    def save_last(self, partial: EpochTotals | None = None) -> None:
        self.state.accum_steps = self.runner.accum
        save_checkpoint(self.last_path, {
            **self._meta(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.data.train.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "state": self.state.as_dict(), "partial": partial.state_dict() if partial is not None else None,
            "stage": self.stage, "ema": self.engine.ema.state_dict() if self.engine.ema is not None else None,
            "skipped_total": self.runner.skipped_total})

    def save_best(self, row: dict[str, float]) -> None:
        """best.pt holds the weights that were validated: the EMA's when train.ema_decay is on."""
        ema = self.engine.ema
        save_checkpoint(self.dir / "checkpoints" / "best.pt",
                        {**self._meta(), "model": (ema.module if ema is not None else self.model).state_dict(),
                         "weights": "ema" if ema is not None else "model", "epoch": row["epoch"], "metrics": row})

    def write_metrics(self) -> None:
        """metrics.csv, rewritten every epoch (a DDP rank other than 0 overrides this with a no-op)."""
        write_text(self.dir / "metrics.csv", _metrics_csv(self.state.history))

    def try_resume(self) -> bool:
        path = self.last_path
        if not path.exists():
            return False
        ckpt = load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self._set_stage(int(ckpt["stage"]))  # the optimizer state belongs to the stage it was saved in
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.engine.ema is not None:  # ema_decay cannot change on resume (preflight.RESUMABLE_DIFFS)
                self.engine.ema.load_state_dict(ckpt["ema"])
            if self.scaler is not None and ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.data.train.load_state_dict(ckpt["loader"])
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt["cuda_rng"] is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
            self.state = FitState(**ckpt["state"])
            self.runner.accum, self.runner.skipped_total = self.state.accum_steps, int(ckpt["skipped_total"])
            if ckpt["partial"] is not None:
                self.partial = EpochTotals.from_state(ckpt["partial"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot resume from it ({first_line(e)})") from None
        where = f"epoch {self.state.epoch + 1} step {self.data.train.position}" if self.partial else \
            f"the end of epoch {self.state.epoch}"
        self.console.print(f"resumed {path} at {where}")
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
        self.write_metrics()
        if st.epoch % tr.checkpoint_every == 0 or st.stopped_early or st.epoch == tr.epochs:
            self.save_last()
        return st.stopped_early

    def _train_epoch(self, epoch: int, hooks: Hooks, progress, stop) -> EpochTotals:
        """Train until the epoch ends, or until a signal asks to stop (then checkpoint mid-epoch and raise)."""
        totals = self.partial or EpochTotals.zeros(self.device, self.optimizer.param_groups[0]["lr"])
        self.partial = None
        loader = self.data.train
        self.model.train()
        task = progress.add_task(f"epoch {epoch + 1}/{self.recipe.train.epochs}", total=loader.num_images,
                                 completed=loader.position * loader.batch_size)
        clock = StepClock(self._warmup_left, lambda: sync(self.device))
        clock.start()
        try:
            for x, y in loader:
                step, seen = loader.position - 1, totals.seen
                self.runner.step(x, y, totals, step)
                clock.step_done(totals.seen - seen)
                progress.advance(task, len(y))
                if hooks.on_step:
                    hooks.on_step(epoch, step)
                if stop is not None and stop.requested:
                    self.runner.check_pending()  # never checkpoint a step that went non-finite
                    self._book_time(totals, clock)
                    self.save_last(partial=totals)
                    raise self._interrupted(stop.signum, epoch, loader.position)
            self.runner.check_pending()
        except NonFiniteStep as e:
            raise self._non_finite(e, epoch) from None
        finally:
            progress.remove_task(task)
        self._book_time(totals, clock)
        return totals

    def _book_time(self, totals: EpochTotals, clock: StepClock) -> None:
        """Warm-up time (compile / capture) goes to compile_time_s and is kept out of img/s (StepClock's rule)."""
        clock.stop()
        totals.seconds += clock.steady_s
        totals.warmup_s += clock.warmup_s
        totals.warmup_seen += clock.warmup_images
        self.state.compile_time_s += clock.warmup_s
        self._warmup_left = clock.warmup_left

    def _interrupted(self, signum: int, epoch: int, steps: int) -> Interrupted:
        run_dir = self.dir if self.recipe.split.kind != "kfold" else self.dir.parent
        return Interrupted(f"stopped by {signal.Signals(signum).name} in fold {self.fold.index} epoch {epoch + 1} "
                           f"after step {steps}/{len(self.data.train)}; checkpoint saved to {self.last_path}; "
                           f"resume with: fastcifar train {run_dir / 'recipe.toml'} --out {run_dir} --resume",
                           signum)

    def _non_finite(self, e: NonFiniteStep, epoch: int) -> NonFiniteError:
        kept = (f"the last good checkpoint {self.last_path} (end of epoch {self.state.epoch}) is kept"
                if self.last_path.exists() else "no checkpoint was written before it")
        return NonFiniteError(f"{e.what} went non-finite in fold {self.fold.index} epoch {epoch + 1} step {e.step}; "
                              f"stopped, {kept}; lower optim.lr, set train.grad_clip, or set "
                              f'train.on_nonfinite = "skip"')

    def fit(self, hooks: Hooks, progress, stop=None) -> None:
        tr = self.recipe.train
        while self.state.epoch < tr.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            if self.stage == 1 and epoch >= self.recipe.finetune.head_epochs:
                self._set_stage(2)
                self.console.print(f"fold {self.fold.index}: stage 2 from epoch {epoch + 1}: all layers train")
            totals = self._train_epoch(epoch, hooks, progress, stop)
            t0 = time.perf_counter()
            val = evaluate(self.engine.eval_net, self.data.val, self.device, self.dtype, len(self.classes),
                           **self.eval_kwargs)
            seen = max(totals.seen, 1)
            row = {"epoch": epoch + 1, "train_loss": float(totals.loss_sum) / seen,
                   "train_acc": int(totals.correct) / seen, "val_loss": val["loss"], "val_acc": val["acc"],
                   "lr": totals.lr, "epoch_time_s": totals.seconds + totals.warmup_s + time.perf_counter() - t0,
                   "img_per_s": images_per_second(totals.seen, totals.seconds, totals.warmup_seen, totals.warmup_s),
                   "skipped_steps": totals.skipped}
            stop_early = self._end_epoch(row)
            self.console.print(
                f"fold {self.fold.index} epoch {row['epoch']:>3}/{tr.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2%}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  "
                f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s  {row['img_per_s']:,.0f} img/s"
                + (f"  skipped {totals.skipped} steps" if totals.skipped else ""))
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1)
            if stop_early:
                self.console.print(f"early stopping: no improvement of {self.recipe.eval.metric} for "
                                   f"{tr.early_stopping_patience} epochs (best epoch {self.state.best_epoch})")

    @property
    def eval_kwargs(self) -> dict[str, Any]:
        return {"tta": self.recipe.eval.tta, "channels_last": self.recipe.train.channels_last}

    def finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint on validation and test: full metrics, costs, figures -> result.json."""
        best = load_checkpoint(self.dir / "checkpoints" / "best.pt")
        # Into the module validation ran on (the EMA copy when on): its compiled eval graph is reused, so no
        # compile time lands in inference_ms_per_image.
        plain = self.engine.ema.module if self.engine.ema is not None else self.model
        plain.load_state_dict(best["model"])
        net, n_cls, kw = self.engine.eval_net, len(self.classes), self.eval_kwargs
        val, ms = timed_evaluate(net, self.data.val, self.device, self.dtype, n_cls, **kw)
        result: dict[str, Any] = {
            "fold": self.fold.index, "best_epoch": best["epoch"], "epochs_run": self.state.epoch,
            "stopped_early": self.state.stopped_early, "val_acc": val["acc"], "val_loss": val["loss"],
            "val_per_class_acc": val["per_class_acc"], "classes": self.classes,
            "train_time_s": sum(r["epoch_time_s"] for r in self.state.history),
            "params": sum(p.numel() for p in self.model.parameters()), "stage_boundary": self.stage_boundary}
        final, split, final_loader = val, "val", self.data.val
        if self.data.test is not None:
            if self.data.test is not self.data.val:
                result["val_metrics"] = compute_metrics(val["logits"], val["targets"], n_cls)
                final, ms = timed_evaluate(net, self.data.test, self.device, self.dtype, n_cls, **kw)
            result.update(test_acc=final["acc"], test_loss=final["loss"], test_per_class_acc=final["per_class_acc"],
                          test_confusion=final["confusion"])
            split, final_loader = "test", self.data.test
        result["metrics"] = {"split": split, **compute_metrics(final["logits"], final["targets"], n_cls)}
        result["inference_ms_per_image"] = ms
        result["peak_memory_mb"], result["peak_memory_kind"] = peak_memory_mb(self.device)
        result["compile_time_s"] = self.state.compile_time_s  # warm-up steps, kept out of img_per_s
        result["engine"] = {**self.engine.summary(self.optimizer), "tta": self.recipe.eval.tta,
                            "channels_last": self.recipe.train.channels_last}
        write_json(self.dir / "result.json", result)  # before the figures: a figure can never cost the result
        if self.recipe.eval.figures:
            train = self.data.train
            try:
                result["figures"] = write_figures(
                    self.dir, self.state.history, final, self.classes, final_loader, train.images.cpu().numpy(),
                    train.labels.cpu().numpy(), plain, self.stage_boundary, self.recipe.eval.gradcam_layer)
            except Exception as e:  # noqa: BLE001 - plotting libraries fail in many ways; the fold is done
                result["figures_error"] = first_line(e)[:200]
                self.console.print(f"[yellow]fold {self.fold.index}: figures not written ({result['figures_error']})"
                                   "; the model and result.json are kept[/yellow]")
            write_json(self.dir / "result.json", result)
        return result
