"""Recipes: TOML files loaded into a tree of frozen, typed dataclasses.

Every key is checked against the dataclass fields (unknown keys are errors), every value against the field's
type, and every section's invariants in `validate()`. All errors are RecipeError with the dotted key path first.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastcifar.errors import RecipeError
from fastcifar.typed_toml import apply_overrides, build, check, short, table_to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

NAME = re.compile(r"\w[\w.+-]{0,99}")  # one plain path component: runs/<name> never leaves runs/
SEED_MAX = 2**32 - 1  # train.seed * 1000 + fold must stay a 64-bit generator seed; numpy wants it >= 0
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataCfg:
    store: str = "data/cifar10"  # a directory written by `fastcifar prepare`
    train_subset: int = 0  # >0: keep this many training images per class (smoke tests); 0 = all
    # Per-channel normalisation in [0, 1] units; "auto": the store's own training statistics (meta.json "stats",
    # recorded by prepare). A run saves the numbers it used, so evaluation and predict apply the same ones.
    mean: tuple[float, float, float] | Literal["auto"] = "auto"
    std: tuple[float, float, float] | Literal["auto"] = "auto"

    def validate(self) -> None:
        check(self.store != "", "data.store", "must name a prepared store directory")
        check(self.train_subset >= 0, "data.train_subset", f"must be >= 0, got {self.train_subset}")
        check(self.std == "auto" or all(s > 0 for s in self.std), "data.std",
              f"every value must be > 0, got {self.std if self.std == 'auto' else list(self.std)}")


@dataclass(frozen=True)
class SplitCfg:
    kind: Literal["official", "holdout", "kfold"] = "official"
    pool: Literal["train", "train+test"] = "train"  # what kfold / holdout split; train+test merges the 60k
    val_fraction: float = 0.1  # holdout only: 0.1 of 50k = the 45k/5k split of seed 002
    k: int = 5
    fold: int = -1  # kfold: which fold is validation; -1 runs all folds in sequence
    seed: int = 0  # the split is a function of this seed only, so every run sees the same folds

    def validate(self) -> None:
        check(0 <= self.seed <= SEED_MAX, "split.seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        check(0.0 < self.val_fraction < 1.0, "split.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.k >= 2, "split.k", f"must be >= 2, got {self.k}")
        check(-1 <= self.fold < self.k, "split.fold",
              f"must be in [-1, {self.k - 1}] (-1 = all folds, k = {self.k}), got {self.fold}")
        check(self.kind != "official" or self.pool == "train", "split.pool",
              "must be 'train' when split.kind = 'official' (the official split has a fixed test set)")


@dataclass(frozen=True)
class ModelCfg:
    name: str = "cnn_bn"  # a registered model, or "timm:<name>" for any timm model (extra [timm])
    width: int = 0  # 0 = the model's default width
    dropout: float = 0.0
    pretrained: str = ""  # a local state-dict file; weights are never downloaded
    # speedrun nets: train the whitening layer's bias for the first n epochs only, then freeze it (airbench: 3);
    # 0 = trained throughout
    whiten_bias_epochs: int = 0
    activation: Literal["gelu", "silu"] = "gelu"  # speedrun nets: the conv groups' activation (Hiverge: SiLU)
    # speedrun nets: the whitening filters from the eigendecomposition of the patch covariance ("eigh") or its SVD
    # ("svd", Hiverge's init: the same filters up to sign, so the same whitened channels in another order)
    whiten_init: Literal["eigh", "svd"] = "eigh"
    # speedrun nets: BatchNorm running-stat momentum in torch's convention (airbench's 0.6 = 0.4 here; Hiverge's
    # 0.5566 = 0.4434), and the BN shifts' learning-rate multiplier over the base lr (airbench: 64)
    bn_momentum: float = 0.4
    bias_lr_scale: float = 64.0

    def validate(self) -> None:
        from fastcifar.models import SPEEDRUN_OPTIONS, known_model, model_names  # late: keeps recipe loading light

        check(known_model(self.name), "model.name",
              f"unknown model '{self.name}' (choose from {', '.join(model_names())}, or timm:<name>)")
        check(self.width >= 0, "model.width", f"must be >= 0, got {self.width}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.whiten_bias_epochs >= 0, "model.whiten_bias_epochs", f"must be >= 0, got {self.whiten_bias_epochs}")
        check(not self.whiten_bias_epochs or self.name.startswith("speedrun_net"), "model.whiten_bias_epochs",
              f"applies to the speedrun nets (their whitening layer), not {self.name}")
        check(0.0 < self.bn_momentum <= 1.0, "model.bn_momentum", f"must be in (0, 1], got {self.bn_momentum}")
        check(self.bias_lr_scale > 0, "model.bias_lr_scale", f"must be > 0, got {self.bias_lr_scale}")
        for key, default in SPEEDRUN_OPTIONS.items():
            check(getattr(self, key) == default or self.name.startswith("speedrun_net"), f"model.{key}",
                  f"applies to the speedrun nets, not {self.name}")


@dataclass(frozen=True)
class AugmentCfg:
    """Train-time augmentation, applied in this order: crop / translate / flip / rotation (uint8) ->
    ColorJitter -> RandAugment or TrivialAugmentWide (uint8) -> normalise + cast -> resize -> shift_jitter ->
    erasing / cutout -> MixUp / CutMix (needs labels; turns targets into class probabilities)."""

    flip: bool = True
    flip_mode: Literal["random", "alternate"] = "random"  # alternate: each image flips on every other epoch
    crop_padding: int = 4  # padded random crop; 0 = off
    crop_padding_mode: Literal["reflect", "constant"] = "reflect"
    translate: int = 0  # random shift of up to this many pixels each way, zero fill; 0 = off
    rotation: float = 0.0  # random rotation in [-deg, deg], nearest, zero fill; 0 = off
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    # (brightness, contrast) jitter on the normalised batch, Hiverge's: x + U(-b, b), then x * U(1 - c, 1 + c) per
    # image (fastcifar.augment.basic.shift_jitter), after normalising and before erasing / cutout; 0 = off
    shift_jitter: tuple[float, float] = (0.0, 0.0)
    resize: int = 0  # >0: bilinear resize to this many pixels after cropping (224 for ImageNet-stem models)
    randaugment: bool = False
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_num_bins: int = 31
    trivialaugment: bool = False  # TrivialAugmentWide (31 bins); exclusive with randaugment
    erasing_p: float = 0.0  # RandomErasing probability; 0 = off
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    erasing_value: Literal["random", "zero", "constant"] = "random"
    erasing_constant: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-channel fill (normalised units)
    cutout: int = 0  # square cutout side in pixels; 0 = off
    # "centre": DeVries & Taylor's cutout, a uniform centre and the square clipped at the border (~118 of 144 px
    # zeroed on average for 12 px at 32 px); "inside": airbench96's, the whole square inside the image.
    cutout_mode: Literal["centre", "inside"] = "centre"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_p: float = 1.0  # probability that a batch is mixed at all (when mixup or cutmix is on)
    mix_switch_p: float = 0.5  # with both on: probability that a mixed batch uses CutMix rather than MixUp

    def validate(self) -> None:
        check(0 <= self.crop_padding <= 16, "augment.crop_padding", f"must be in [0, 16], got {self.crop_padding}")
        check(0 <= self.translate <= 16, "augment.translate", f"must be in [0, 16], got {self.translate}")
        check(0.0 <= self.rotation <= 180.0, "augment.rotation", f"must be in [0, 180], got {self.rotation}")
        b, c, s, h = self.color_jitter
        check(min(b, c, s) >= 0 and 0.0 <= h <= 0.5, "augment.color_jitter",
              f"brightness, contrast, saturation must be >= 0 and hue in [0, 0.5], got {[b, c, s, h]}")
        check(min(self.shift_jitter) >= 0 and self.shift_jitter[1] < 1, "augment.shift_jitter",
              f"brightness must be >= 0 and contrast in [0, 1), got {list(self.shift_jitter)}")
        check(self.resize == 0 or 8 <= self.resize <= 512, "augment.resize",
              f"must be 0 (off) or in [8, 512], got {self.resize}")
        check(self.randaugment_num_ops >= 0, "augment.randaugment_num_ops", "must be >= 0")
        check(self.randaugment_num_bins >= 2, "augment.randaugment_num_bins", "must be >= 2")
        check(0 <= self.randaugment_magnitude < self.randaugment_num_bins, "augment.randaugment_magnitude",
              f"must be in [0, randaugment_num_bins - 1 = {self.randaugment_num_bins - 1}]")
        check(not (self.randaugment and self.trivialaugment), "augment.trivialaugment",
              "cannot be on together with augment.randaugment (pick one)")
        check(0.0 <= self.erasing_p <= 1.0, "augment.erasing_p", f"must be in [0, 1], got {self.erasing_p}")
        lo, hi = self.erasing_scale
        check(0.0 < lo <= hi < 1.0, "augment.erasing_scale", f"must satisfy 0 < lo <= hi < 1, got {[lo, hi]}")
        lo, hi = self.erasing_ratio
        check(0.0 < lo <= hi, "augment.erasing_ratio", f"must satisfy 0 < lo <= hi, got {[lo, hi]}")
        check(self.cutout >= 0, "augment.cutout", f"must be >= 0, got {self.cutout}")
        check(self.mixup_alpha >= 0, "augment.mixup_alpha", f"must be >= 0, got {self.mixup_alpha}")
        check(self.cutmix_alpha >= 0, "augment.cutmix_alpha", f"must be >= 0, got {self.cutmix_alpha}")
        check(0.0 <= self.mix_p <= 1.0, "augment.mix_p", f"must be in [0, 1], got {self.mix_p}")
        check(0.0 <= self.mix_switch_p <= 1.0, "augment.mix_switch_p", f"must be in [0, 1], got {self.mix_switch_p}")


@dataclass(frozen=True)
class OptimCfg:
    # muon: torch.optim.Muon on the conv filters (each flattened to a matrix), SGD with lr / momentum /
    # nesterov / weight_decay below on everything else (BatchNorm shifts, biases, the classifier)
    name: Literal["sgd", "adam", "adamw", "muon"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    muon_lr: float = 0.02  # Muon's own learning rate for the conv filters (scaled by the schedule like lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # "torch": torch.optim.Muon, one Newton-Schulz per filter; "batched": fastcifar.muon.BatchedMuon, one batched
    # call per step over all filters padded into one 3-D tensor (the records'), with the options below
    muon_impl: Literal["torch", "batched"] = "torch"
    muon_ns_steps: int = 5  # batched: Newton-Schulz iterations (the records: 3)
    muon_ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)  # batched: (a, b, c)
    muon_ns_dtype: Literal["float32", "bfloat16"] = "float32"  # batched: airbench94_muon iterates in bf16
    # batched: filters renormalised to norm sqrt(out channels) before the update: "every" step (airbench94_muon),
    # "adaptive" (Hiverge: when step - last >= 2 + floor(15 * step / total steps)), or "none"
    muon_renorm: Literal["none", "every", "adaptive"] = "none"
    # Lookahead (airbench's): every lookahead_every steps the weights and float buffers are pulled to a slow
    # copy that follows them, slow += (1 - d) (w - slow), w = slow, with d = lookahead_decay * (t / T) ^
    # lookahead_power rising over the run (t steps done of T); after the last step (its pull first, if it is
    # one) the weights become the slow copy. 0 = off; airbench94: every 5 steps, decay 0.95^5 = 0.774, power 3.
    lookahead_every: int = 0
    lookahead_decay: float = 0.95**5
    lookahead_power: float = 3.0

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", f"must be in [0, 1), got {list(self.betas)}")
        check(not self.nesterov or (self.name in ("sgd", "muon") and self.momentum > 0), "optim.nesterov",
              "needs optim.name = 'sgd' or 'muon' and optim.momentum > 0")
        check(self.muon_lr > 0, "optim.muon_lr", f"must be > 0, got {self.muon_lr}")
        check(0.0 <= self.muon_momentum < 1.0, "optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        check(self.muon_weight_decay >= 0, "optim.muon_weight_decay", f"must be >= 0, got {self.muon_weight_decay}")
        check(self.muon_ns_steps >= 1, "optim.muon_ns_steps", f"must be >= 1, got {self.muon_ns_steps}")
        batched = ("muon_ns_steps", "muon_ns_coefficients", "muon_ns_dtype", "muon_renorm")
        changed = [k for k in batched if getattr(self, k) != getattr(OptimCfg, k)]
        check(self.muon_impl == "batched" or not changed, f"optim.{changed[0] if changed else ''}",
              'applies to optim.muon_impl = "batched" only')
        check(self.lookahead_every >= 0, "optim.lookahead_every", f"must be >= 0, got {self.lookahead_every}")
        check(0.0 <= self.lookahead_decay <= 1.0, "optim.lookahead_decay",
              f"must be in [0, 1], got {self.lookahead_decay}")
        check(self.lookahead_power >= 0, "optim.lookahead_power", f"must be >= 0, got {self.lookahead_power}")


@dataclass(frozen=True)
class ScheduleCfg:
    # triangle: airbench's piecewise-linear schedule (fastcifar.optim.triangle_factor): up from
    # peak / div_factor to the peak at pct_start of the steps, down to peak / (div_factor * final_div_factor) at
    # the end; momentum stays optim.momentum. OneCycle's linear anneal differs from it by a step at each end.
    # linear: 1 - t / T from the first step (after any warm-up) to 0 at the end, the records' decay
    name: Literal["constant", "onecycle", "triangle", "cosine", "step", "linear"] = "onecycle"
    warmup_epochs: float = 0.0  # linear warm-up before constant / cosine / step (OneCycle, triangle: their own)
    max_lr: float = 0.0  # onecycle / triangle peak; 0 = optim.lr
    pct_start: float = 0.25
    anneal: Literal["cos", "linear"] = "cos"
    # onecycle: cycle momentum 0.95 -> 0.85 -> 0.95 against the lr (torch's default); false keeps optim.momentum
    # throughout, as airbench does
    cycle_momentum: bool = True
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    min_lr: float = 0.0  # cosine floor
    step_epochs: int = 30  # step: multiply by gamma every step_epochs
    gamma: float = 0.1

    def validate(self) -> None:
        check(self.warmup_epochs >= 0, "schedule.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check(self.name not in ("onecycle", "triangle") or self.warmup_epochs == 0, "schedule.warmup_epochs",
              f"must be 0 with {self.name} (use schedule.pct_start)")
        check(self.max_lr >= 0, "schedule.max_lr", f"must be >= 0, got {self.max_lr}")
        check(0.0 < self.pct_start < 1.0, "schedule.pct_start", f"must be in (0, 1), got {self.pct_start}")
        check(self.div_factor > 0 and self.final_div_factor > 0, "schedule.div_factor", "factors must be > 0")
        check(self.min_lr >= 0, "schedule.min_lr", f"must be >= 0, got {self.min_lr}")
        check(self.step_epochs >= 1, "schedule.step_epochs", f"must be >= 1, got {self.step_epochs}")
        check(0.0 < self.gamma <= 1.0, "schedule.gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass(frozen=True)
class FinetuneCfg:
    """Two-stage fine-tuning (seed 002): the head alone first, then everything with optim + schedule."""

    head_epochs: int = 0  # stage 1 length: only the classifier head trains; 0 = a single stage
    head_lr: float = 1e-3  # stage 1 learning rate (constant)

    def validate(self) -> None:
        check(self.head_epochs >= 0, "finetune.head_epochs", f"must be >= 0, got {self.head_epochs}")
        check(self.head_lr > 0, "finetune.head_lr", f"must be > 0, got {self.head_lr}")


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 10
    # Total optimizer steps; 0 = train.epochs whole epochs. Set, the run stops inside its last epoch after that many
    # steps, and the schedule and Lookahead span them: the speed records' fractional epochs (Hiverge's 7.59 epochs
    # of 32 steps = 243 steps: epochs = 8, steps = 243). train.epochs must be the epochs they reach (preflight).
    steps: int = 0
    batch_size: int = 256
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # bf16 autocast on CUDA (fp16 + GradScaler without bf16) and MPS fp16; the CPU stays fp32 with true (unless
    # amp_cpu). "auto": the same on accelerators, and on the CPU the faster of fp32 and bf16 for this model on this
    # machine, measured once and cached (fastcifar.precision; result.json engine.precision says which and why)
    amp: bool | Literal["auto"] = False
    amp_cpu: bool = False  # also bf16 autocast on the CPU (cnn_bn trained at 41 vs 521 img/s fp32 on a 2-core EPYC)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    early_stopping_patience: int = 0  # validations (eval.every) without improvement of eval.metric; 0 = off
    checkpoint_every: int = 1  # epochs between `last` checkpoints
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    deterministic: bool = False  # deterministic kernels: same device + seed -> identical weights
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip that step
    max_skipped_steps: int = 100  # skip mode gives up after this many skipped steps in one fold
    oom_retry: bool = False  # on out-of-memory, retry the batch as 2, 4, ... micro-batches (same effective batch)
    # Where the metrics go: metrics.csv is always written (the report reads it); "tensorboard" adds one event
    # folder per fold (FOLD/tensorboard; extra [tensorboard]), step-level every log_every steps.
    log: tuple[Literal["csv", "tensorboard"], ...] = ("csv",)
    log_every: int = 50  # steps between step-level TensorBoard points (each costs one read of the device)
    # -- input pipeline --------------------------------------------------------------------------------------
    loader: Literal["device", "torchvision", "dali", "ffcv"] = "device"  # device: resident store + batched aug
    # "torchvision": DataLoader worker processes; "dali" / "ffcv": their CPU threads (at most the machine's cores,
    # fitted with one line saying so); unused by the device loader
    workers: int = 4
    # -- engine ------------------------------------------------------------------------------------------------
    channels_last: bool = True  # NHWC weights and activations (the fast conv layout on CUDA and oneDNN)
    compile: bool = False  # torch.compile the model (CUDA; compile time is logged and kept out of img/s)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cuda_graphs: bool = False  # capture forward + backward as CUDA graphs (the optimizer step stays eager)
    # Compile the whole step - forward, loss, gradients and the optimizer update - as one graph with no graph break
    # (fastcifar.fused_step; train.compile_mode applies; train.compile still decides the evaluation model's).
    # Needs optim.name "sgd", or "muon" with muon_impl = "batched", no grad_clip, on_nonfinite = "stop".
    compile_step: bool = False
    ema_decay: float = 0.0  # weight EMA decay per step (e.g. 0.999); the EMA weights are evaluated; 0 = off
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun

    def validate(self) -> None:
        check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        check(self.steps >= 0, "train.steps", f"must be >= 0 (0 = train.epochs whole epochs), got {self.steps}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing",
              f"must be in [0, 1), got {self.label_smoothing}")
        check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        check(self.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        check(0 <= self.seed <= SEED_MAX, "train.seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        check(0 <= self.threads <= 4096, "train.threads", f"must be in [0, 4096], got {self.threads}")
        check(self.max_skipped_steps >= 1, "train.max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}")
        check(0 <= self.workers <= 1024, "train.workers", f"must be in [0, 1024], got {self.workers}")
        check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class EvalCfg:
    batch_size: int = 1024
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # picks the best checkpoint and drives early stopping
    figures: bool = True  # curves, confusion, samples, predictions, mistakes, Grad-CAM PNGs for every fold
    gradcam_layer: str = ""  # a dotted module name (e.g. "layer4.1.conv2"); "" = the last conv layer
    tta: Literal["none", "flip", "flip_translate", "flip_translate_mean"] = "none"  # test-time augmentation:
    # average the logits of the image and its mirror ("flip"), plus 1-pixel shifts of both ("flip_translate",
    # airbench's weights 1/4, 1/4, 1/8 x 4; "flip_translate_mean": the same six views at 1/6 each, Hiverge's)
    # Only this fraction of the evaluated images, the least confident by the plain view's softmax maximum, gets the
    # views (Hiverge: 0.25); 1 = all. Evaluation only: predict and export apply every view.
    tta_fraction: float = 1.0
    # Validate after every `every`-th epoch and always after the last (0: after the last only). best.pt and
    # early stopping see validated epochs only; train.early_stopping_patience then counts validations. With
    # 6-view TTA a speed run's validation costs ~40 % of a training epoch's FLOPs: a run of seconds needs it once.
    every: int = 1

    def validate(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.every >= 0, "eval.every", f"must be >= 0 (0 = after the last epoch only), got {self.every}")
        check(0.0 < self.tta_fraction <= 1.0, "eval.tta_fraction", f"must be in (0, 1], got {self.tta_fraction}")


@dataclass(frozen=True)
class Recipe:
    name: str = "unnamed"
    data: DataCfg = field(default_factory=DataCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)

    def validate(self) -> None:
        check(NAME.fullmatch(self.name) is not None, "name", "must be one plain folder name (letters, digits and "
              f"_ . + -, not starting with . or -, at most 100 characters), got {short(self.name)}")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        if self.train.compile_step:
            from fastcifar.fused_step import check_recipe  # late, as ModelCfg's models import

            check_recipe(self)
        check(self.finetune.head_epochs < self.train.epochs, "finetune.head_epochs",
              f"must be < train.epochs ({self.train.epochs}) so stage 2 has epochs, got {self.finetune.head_epochs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def recipe_from_dict(table: dict[str, Any]) -> Recipe:
    recipe = build(Recipe, table, "")
    recipe.validate()
    return recipe


def builtin_recipes() -> dict[str, str]:
    """name -> TOML text of the recipes installed with fastcifar (the package fastcifar.recipes)."""
    folder = importlib.resources.files("fastcifar.recipes")
    return {p.name[:-len(".toml")]: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir(), key=str)
            if p.name.endswith(".toml")}


def recipe_summary(text: str) -> str:
    """A recipe's first comment line: what it is, in one line."""
    return next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file, or a built-in recipe by name ("quickstart" or "quickstart.toml") when no such file exists."""
    path = Path(path)
    try:
        builtin = builtin_recipes() if not path.exists() and path.parent == Path(".") else {}
        name = path.name.removesuffix(".toml")
        text = builtin[name] if name in builtin else path.read_text(encoding="utf-8")
        table = tomllib.loads(text)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found (built-in recipes: {', '.join(builtin_recipes())})") \
            from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays / inline tables
        raise RecipeError(f"{path}: not valid TOML (nested too deeply)") from None
    try:
        return recipe_from_dict(apply_overrides(table, overrides or []))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------- saving


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe, every key explicit, so a run directory says exactly what ran."""
    return table_to_toml(recipe.to_dict())


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for k in da:
        if isinstance(da[k], dict):
            out.extend(f"{k}.{kk}" for kk in da[k] if da[k][kk] != db[k][kk])
        elif da[k] != db[k]:
            out.append(k)
    return out
