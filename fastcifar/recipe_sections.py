"""The recipe's sections: one frozen dataclass per TOML table, each field declared with setting(default, meaning)
(`fastcifar recipes keys` prints them) and each section's invariants in validate(). fastcifar.recipe assembles
them into a Recipe and loads it; it re-exports every name here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fastcifar.typed_toml import check, setting

NAME = re.compile(r"\w[\w.+-]{0,99}")  # one plain path component: runs/<name> never leaves runs/
SEED_MAX = 2**32 - 1  # train.seed * 1000 + fold must stay a 64-bit generator seed; numpy wants it >= 0
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_STORE = "data/cifar10"  # where `fastcifar prepare` writes and recipes and the benchmarks read by default
# Bounds that the sections' own rules leave open, (low, high) inclusive: past them a value cannot be represented
# where it is used (optimizer scalars are float32, 3.4e38 at most: optim.lr = 1e40 died at the first step after
# the run folder existed; warm-up epochs x steps overflowed an int; 1e12 RandAugment bins asked for 4 TB) or
# means nothing. tests/test_recipe.py checks that every float key refuses +-1e40.
LR = (0.0, 1e3)  # learning rates: schedules peak at ~10 at most (LARS at 32k batches)
LIMITS: dict[str, tuple[float, float]] = {
    "data.mean": (0.0, 1.0), "data.std": (1e-3, 10.0),  # [0, 1] pixel units (not 0-255)
    "augment.color_jitter": (0.0, 10.0), "augment.erasing_ratio": (1e-3, 1e3),
    "augment.erasing_constant": (-1e3, 1e3),  # normalised units: pixels span about +-3
    "augment.mixup_alpha": (0.0, 100.0), "augment.cutmix_alpha": (0.0, 100.0),
    "augment.randaugment_num_ops": (0, 100), "augment.randaugment_num_bins": (2, 1000),
    "optim.lr": LR, "optim.muon_lr": LR, "schedule.max_lr": LR, "schedule.min_lr": LR, "finetune.head_lr": LR,
    "optim.weight_decay": (0.0, 100.0), "optim.muon_weight_decay": (0.0, 100.0),
    "optim.lookahead_power": (0.0, 100.0), "schedule.warmup_epochs": (0.0, 1e6),
    "schedule.div_factor": (1e-3, 1e9), "schedule.final_div_factor": (1e-3, 1e9), "train.grad_clip": (0.0, 1e6),
    "model.bias_lr_scale": (0.0, 1e6), "augment.shift_jitter": (0.0, 10.0),  # normalised units: pixels span about +-3
    "optim.muon_ns_coefficients": (-1e3, 1e3),  # the records' quintic: 3.4445, -4.775, 2.0315
}


@dataclass(frozen=True)
class DataCfg:
    """Where the images come from and how they are normalised."""

    store: str = setting(DEFAULT_STORE, "a directory written by `fastcifar prepare`")
    train_subset: int = setting(0, "training images kept PER CLASS (the first n of each; 200 on CIFAR-10 = 2,000 "
                                   "images), for smoke tests; 0 = all")
    eval_subset: int = setting(0, "validation and test images kept PER CLASS (the first n of each; 20 on CIFAR-10 = "
                                  "200 of the 10,000 test images), for smoke tests: every fold's validation set and "
                                  "the test set are capped, and results say \"on N of M test images\"; 0 = all")
    # "auto" reads meta.json "stats", recorded by prepare; a run saves the numbers it used, so evaluation and
    # predict apply the same ones.
    mean: tuple[float, float, float] | Literal["auto"] = setting(
        "auto", "per-channel mean subtracted, in [0, 1] units; \"auto\" = the store's own training statistics")
    std: tuple[float, float, float] | Literal["auto"] = setting(
        "auto", "per-channel standard deviation divided by, in [0, 1] units; \"auto\" = the store's own")

    def validate(self) -> None:
        check(self.store != "", "data.store", "must name a prepared store directory")
        check(self.train_subset >= 0, "data.train_subset", f"must be >= 0, got {self.train_subset}")
        check(self.eval_subset >= 0, "data.eval_subset", f"must be >= 0 (0 = all), got {self.eval_subset}")
        check(self.std == "auto" or all(s > 0 for s in self.std), "data.std",
              f"every value must be > 0, got {self.std if self.std == 'auto' else list(self.std)}")


@dataclass(frozen=True)
class SplitCfg:
    """Which images train, validate and test."""

    kind: Literal["official", "holdout", "kfold"] = setting(
        "official", "official: train on the store's train set, validate and test on its test set; holdout: hold "
                    "out split.val_fraction of the pool; kfold: split.k stratified folds of the pool")
    pool: Literal["train", "train+test"] = setting(
        "train", "what holdout / kfold split: the train set (the test set stays the test set), or train+test merged "
                 "(60k for CIFAR-10; then there is no untouched test set)")
    val_fraction: float = setting(0.1, "holdout: the fraction of the pool held out for validation (0.1 of 50k = the "
                                       "45k / 5k split of seed 002)")
    k: int = setting(5, "kfold: the number of folds")
    fold: int = setting(-1, "kfold: the fold used for validation; -1 trains all folds in sequence")
    seed: int = setting(0, "the split's seed: the folds are a function of it alone, so every run sees the same ones")

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
    """The network."""

    name: str = setting("cnn_bn", "a registered model (e.g. cnn_bn, resnet18, speedrun_net; an unknown name is "
                                  "refused with the full list), or \"timm:<name>\" for any timm model (extra [timm])")
    width: int = setting(0, "the model's width (its base channel count; mlp: its first hidden layer); 0 = the "
                            "model's default; models without one refuse any other value")
    dropout: float = setting(0.0, "dropout probability, in [0, 1) (where the model has a dropout layer)")
    pretrained: str = setting("", "a local state-dict file to start from; \"\" = random init (weights are never "
                                  "downloaded)")
    # airbench trains it for 3
    whiten_bias_epochs: int = setting(0, "speedrun nets: train the whitening layer's bias for the first n epochs "
                                         "only, then freeze it; 0 = trained throughout")
    # The speedrun nets' own options (models.SPEEDRUN_OPTIONS: each default there is the default here)
    activation: Literal["gelu", "silu"] = setting("gelu", "speedrun nets: the conv groups' activation (Hiverge's "
                                                          "record: silu)")
    # svd: the same filters up to sign, so the same whitened channels in another order
    whiten_init: Literal["eigh", "svd"] = setting(
        "eigh", "speedrun nets: the whitening filters from the eigendecomposition of the patch covariance (eigh) or "
                "its SVD (svd, Hiverge's init)")
    # airbench's 0.6 is 0.4 here; Hiverge's 0.5566 is 0.4434
    bn_momentum: float = setting(0.4, "speedrun nets: BatchNorm running-statistics momentum in torch's convention, "
                                      "in (0, 1]")
    bias_lr_scale: float = setting(64.0, "speedrun nets: the BatchNorm shifts' learning-rate multiplier over the "
                                         "base lr (airbench: 64)")

    def validate(self) -> None:
        from fastcifar.models import known_model, model_entry, model_names, models_taking, option_defaults  # late

        check(known_model(self.name), "model.name",
              f"unknown model '{self.name}' (choose from {', '.join(model_names())}, or timm:<name>)")
        check(self.width >= 0, "model.width", f"must be >= 0, got {self.width}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.whiten_bias_epochs >= 0, "model.whiten_bias_epochs", f"must be >= 0, got {self.whiten_bias_epochs}")
        check(not self.whiten_bias_epochs or model_entry(self.name).whiten_bias, "model.whiten_bias_epochs",
              f"applies to the speedrun nets (their whitening layer), not {self.name}")
        check(0.0 < self.bn_momentum <= 1.0, "model.bn_momentum", f"must be in (0, 1], got {self.bn_momentum}")
        check(self.bias_lr_scale > 0, "model.bias_lr_scale", f"must be > 0, got {self.bias_lr_scale}")
        options = model_entry(self.name).options
        for key, default in option_defaults().items():  # a model's own options: other models leave the default
            check(getattr(self, key) == default or key in options, f"model.{key}",
                  f"applies to {', '.join(models_taking(key))}, not {self.name}")


@dataclass(frozen=True)
class AugmentCfg:
    """Train-time augmentation, applied in this order: crop / translate / flip / rotation (uint8) ->
    ColorJitter -> RandAugment or TrivialAugmentWide (uint8) -> normalise + cast -> resize -> shift_jitter ->
    erasing / cutout -> MixUp / CutMix (needs labels; turns targets into class probabilities)."""

    flip: bool = setting(True, "random horizontal flips")
    flip_mode: Literal["random", "alternate"] = setting(
        "random", "random: each image flips with probability 0.5; alternate: each image flips on every other epoch")
    crop_padding: int = setting(4, "padded random crop: pad by this many pixels, crop back to size; 0 = off")
    crop_padding_mode: Literal["reflect", "constant"] = setting("reflect", "how the crop's padding is filled")
    translate: int = setting(0, "random shift of up to this many pixels each way, zero fill; 0 = off")
    rotation: float = setting(0.0, "random rotation in [-deg, deg], nearest, zero fill; 0 = off")
    color_jitter: tuple[float, float, float, float] = setting(
        (0.0, 0.0, 0.0, 0.0), "ColorJitter strengths: brightness, contrast, saturation, hue; zeros = off")
    # Hiverge's (fastcifar.augment.basic.shift_jitter)
    shift_jitter: tuple[float, float] = setting(
        (0.0, 0.0), "(brightness, contrast) jitter on the normalised batch: x + U(-b, b), then x * U(1 - c, 1 + c) "
                    "per image, before erasing / cutout; zeros = off")
    resize: int = setting(0, "bilinear resize to this many pixels after cropping (224 for ImageNet-stem models), "
                             "in training and evaluation; 0 = off")
    randaugment: bool = setting(False, "RandAugment (exclusive with augment.trivialaugment)")
    randaugment_num_ops: int = setting(2, "RandAugment: operations per image")
    randaugment_magnitude: int = setting(9, "RandAugment: magnitude bin, in [0, randaugment_num_bins - 1]")
    randaugment_num_bins: int = setting(31, "RandAugment: number of magnitude bins")
    trivialaugment: bool = setting(False, "TrivialAugmentWide (31 bins); exclusive with augment.randaugment")
    erasing_p: float = setting(0.0, "RandomErasing probability per image; 0 = off")
    erasing_scale: tuple[float, float] = setting((0.02, 0.33), "RandomErasing: range of the erased area's fraction")
    erasing_ratio: tuple[float, float] = setting((0.3, 3.3), "RandomErasing: range of the erased box's aspect ratio")
    erasing_value: Literal["random", "zero", "constant"] = setting(
        "random", "RandomErasing fill: random normal noise, zeros, or augment.erasing_constant")
    erasing_constant: tuple[float, float, float] = setting(
        (0.0, 0.0, 0.0), "RandomErasing: the per-channel fill of erasing_value = \"constant\" (normalised units)")
    cutout: int = setting(0, "square cutout side in pixels; 0 = off")
    # "centre" zeroes ~118 of 144 px on average for 12 px at 32 px
    cutout_mode: Literal["centre", "inside"] = setting(
        "centre", "centre: DeVries & Taylor's cutout (a uniform centre, the square clipped at the border); inside: "
                  "airbench96's (the whole square inside the image)")
    mixup_alpha: float = setting(0.0, "MixUp Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = setting(0.0, "CutMix Beta(alpha, alpha); 0 = off")
    mix_p: float = setting(1.0, "probability that a batch is mixed at all (when MixUp or CutMix is on)")
    mix_switch_p: float = setting(0.5, "with MixUp and CutMix both on: probability that a mixed batch uses CutMix")

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
    """The optimizer."""

    name: Literal["sgd", "adam", "adamw", "muon"] = setting(
        "sgd", "the optimizer; muon: torch.optim.Muon on the conv filters (each flattened to a matrix), SGD with "
               "lr / momentum / nesterov / weight_decay on everything else (BatchNorm shifts, biases, classifier)")
    lr: float = setting(0.1, "learning rate (the peak of onecycle / triangle unless schedule.max_lr is set)")
    momentum: float = setting(0.9, "SGD momentum (and muon's SGD part)")
    nesterov: bool = setting(False, "Nesterov momentum (sgd, muon)")
    weight_decay: float = setting(5e-4, "weight decay (decoupled for adamw)")
    betas: tuple[float, float] = setting((0.9, 0.999), "adam / adamw: the moment decay rates")
    muon_lr: float = setting(0.02, "muon: the conv filters' own learning rate (scaled by the schedule like lr)")
    muon_momentum: float = setting(0.95, "muon: the conv filters' momentum")
    muon_weight_decay: float = setting(0.0, "muon: the conv filters' weight decay")
    # batched: Hiverge's; one Newton-Schulz call per step over every filter, zero-padded into one 3-D tensor
    muon_impl: Literal["torch", "batched"] = setting(
        "torch", "muon: torch.optim.Muon (one Newton-Schulz per filter), or batched: fastcifar.muon.BatchedMuon, "
                 "the records' (options muon_ns_*, muon_renorm)")
    muon_ns_steps: int = setting(5, "muon_impl = \"batched\": Newton-Schulz iterations (the records: 3)")
    muon_ns_coefficients: tuple[float, float, float] = setting(
        (3.4445, -4.775, 2.0315), "muon_impl = \"batched\": the Newton-Schulz polynomial's (a, b, c)")
    muon_ns_dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "muon_impl = \"batched\": the Newton-Schulz iteration's dtype (airbench94_muon: bfloat16)")
    # adaptive: when step - last >= 2 + floor(15 * step / total steps)
    muon_renorm: Literal["none", "every", "adaptive"] = setting(
        "none", "muon_impl = \"batched\": renormalise the filters to norm sqrt(out channels) before the update: "
                "every step (airbench94_muon), adaptive (Hiverge's), or none")
    # Lookahead (airbench's): every lookahead_every steps the weights and float buffers are pulled to a slow
    # copy that follows them, slow += (1 - d) (w - slow), w = slow, with d = lookahead_decay * (t / T) ^
    # lookahead_power rising over the run (t steps done of T); after the last step (its pull first, if it is
    # one) the weights become the slow copy. airbench94: every 5 steps, decay 0.95^5 = 0.774, power 3.
    lookahead_every: int = setting(0, "Lookahead: steps between pulls of the weights to their slow copy; 0 = off")
    lookahead_decay: float = setting(0.95**5, "Lookahead: the slow copy's decay d at the end of the run")
    lookahead_power: float = setting(3.0, "Lookahead: d rises as lookahead_decay * (step / steps) ^ this power")

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
    """The learning-rate schedule, stepped every optimizer step (not every epoch)."""

    # triangle: airbench's piecewise-linear schedule (fastcifar.optim.triangle_factor); momentum stays
    # optim.momentum. OneCycle's linear anneal differs from it by a step at each end. linear: the records' decay.
    name: Literal["constant", "onecycle", "triangle", "cosine", "step", "linear"] = setting(
        "onecycle", "onecycle: torch's OneCycleLR; triangle: airbench's, up from peak / div_factor to the peak at "
                    "pct_start of the steps, straight down to peak / (div_factor * final_div_factor); linear: 1 - t / "
                    "T from the first step (after any warm-up) to 0 at the end; cosine, step, constant: with "
                    "optional linear warm-up")
    warmup_epochs: float = setting(0.0, "linear warm-up before constant / cosine / step, in epochs (fractions "
                                        "allowed); onecycle and triangle have their own (pct_start)")
    max_lr: float = setting(0.0, "onecycle / triangle peak; 0 = optim.lr")
    pct_start: float = setting(0.25, "onecycle / triangle: the fraction of the steps spent rising to the peak")
    anneal: Literal["cos", "linear"] = setting("cos", "onecycle: the shape of the rise and fall")
    cycle_momentum: bool = setting(True, "onecycle: cycle momentum 0.95 -> 0.85 -> 0.95 against the lr (torch's "
                                         "default); false keeps optim.momentum throughout, as airbench does")
    div_factor: float = setting(25.0, "onecycle / triangle: the start lr is the peak / div_factor")
    final_div_factor: float = setting(1e4, "onecycle / triangle: the end lr is the start lr / final_div_factor")
    min_lr: float = setting(0.0, "cosine: the floor it anneals to")
    step_epochs: int = setting(30, "step: multiply the lr by gamma every step_epochs epochs")
    gamma: float = setting(0.1, "step: the factor")

    def validate(self) -> None:
        check(self.warmup_epochs >= 0, "schedule.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check(self.name not in ("onecycle", "triangle") or self.warmup_epochs == 0, "schedule.warmup_epochs",
              f"must be 0 with {self.name} (use schedule.pct_start)")
        check(self.max_lr >= 0, "schedule.max_lr", f"must be >= 0, got {self.max_lr}")
        check(0.0 < self.pct_start < 1.0, "schedule.pct_start", f"must be in (0, 1), got {self.pct_start}")
        check(self.div_factor > 0, "schedule.div_factor", f"must be > 0, got {self.div_factor}")
        check(self.final_div_factor > 0, "schedule.final_div_factor", f"must be > 0, got {self.final_div_factor}")
        check(self.min_lr >= 0, "schedule.min_lr", f"must be >= 0, got {self.min_lr}")
        check(self.step_epochs >= 1, "schedule.step_epochs", f"must be >= 1, got {self.step_epochs}")
        check(0.0 < self.gamma <= 1.0, "schedule.gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass(frozen=True)
class FinetuneCfg:
    """Two-stage fine-tuning (seed 002): the head alone first, then everything with optim + schedule."""

    head_epochs: int = setting(0, "stage 1 length in epochs: only the classifier head trains; 0 = a single stage")
    head_lr: float = setting(1e-3, "stage 1 learning rate (constant)")

    def validate(self) -> None:
        check(self.head_epochs >= 0, "finetune.head_epochs", f"must be >= 0, got {self.head_epochs}")
        check(self.head_lr > 0, "finetune.head_lr", f"must be > 0, got {self.head_lr}")


@dataclass(frozen=True)
class TrainCfg:
    """The training loop, its precision, input pipeline and engine."""

    epochs: int = setting(10, "epochs to train (both stages together with finetune)")
    # Hiverge's 7.59 epochs of 32 steps = 243 steps: epochs = 8, steps = 243
    steps: int = setting(0, "total optimizer steps, ending inside the last of train.epochs (a fractional last "
                            "epoch, as the speed records train; the schedule spans them); 0 = whole epochs")
    batch_size: int = setting(256, "images per optimizer step (the global batch under torchrun)")
    seed: int = setting(0, "the seed of initialisation, shuffling and augmentation (fold f uses seed * 1000 + f)")
    device: Literal["auto", "cpu", "cuda", "mps"] = setting("auto", "where to train; auto: cuda, else mps, else cpu")
    # "auto" on the CPU: fastcifar.precision; result.json engine.precision says which and why
    amp: bool | Literal["auto"] = setting(
        False, "bf16 autocast on CUDA (fp16 + GradScaler without bf16) and fp16 on MPS; the CPU stays fp32 unless "
               "train.amp_cpu; \"auto\": the same on accelerators, and on the CPU the faster of fp32 and bf16 for "
               "this model on this machine, measured once and cached")
    # cnn_bn trained at 41 vs 521 img/s fp32 on a 2-core EPYC
    amp_cpu: bool = setting(False, "with train.amp: bf16 autocast on the CPU too (usually slower there)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    grad_clip: float = setting(0.0, "clip the global gradient norm to this; 0 = off")
    early_stopping_patience: int = setting(0, "stop after this many validations (eval.every) without improvement "
                                              "of eval.metric; 0 = off")
    checkpoint_every: int = setting(1, "epochs between checkpoints/last.pt writes")
    threads: int = setting(0, "CPU intra-op threads; 0 = torch's default")
    deterministic: bool = setting(False, "deterministic kernels: the same device and seed give identical weights")
    on_nonfinite: Literal["stop", "skip"] = setting("stop", "a NaN/inf loss or gradient: stop the run (exit 3), "
                                                            "or skip that step and count it")
    max_skipped_steps: int = setting(100, "skip mode gives up after this many skipped steps in one fold")
    oom_retry: bool = setting(False, "on out-of-memory, retry the batch as 2, 4, ... micro-batches (gradient "
                                     "accumulation, same effective batch)")
    log: tuple[Literal["csv", "tensorboard"], ...] = setting(
        ("csv",), "where metrics go: metrics.csv is always written (the report reads it); \"tensorboard\" adds "
                  "an event folder per fold (FOLD/tensorboard; extra [tensorboard])")
    log_every: int = setting(50, "steps between step-level TensorBoard points (each costs one read of the device)")
    # -- input pipeline --------------------------------------------------------------------------------------
    loader: Literal["device", "torchvision", "dali", "ffcv"] = setting(
        "device", "what feeds training: device (the store held on the device, batched augmentation), torchvision "
                  "(PIL + DataLoader workers), dali, ffcv (extras of the same names)")
    workers: int = setting(4, "torchvision: DataLoader worker processes; dali / ffcv: their CPU threads (at most "
                              "the machine's cores); unused by the device loader")
    # -- engine ------------------------------------------------------------------------------------------------
    channels_last: bool = setting(True, "NHWC weights and activations (the fast conv layout on CUDA and oneDNN)")
    compile: bool = setting(False, "torch.compile the model (compile time is logged and kept out of img/s)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = setting(
        "default", "torch.compile's mode")
    cuda_graphs: bool = setting(False, "capture forward + backward as CUDA graphs (the optimizer step stays eager)")
    # fastcifar.fused_step; train.compile still decides the evaluation model's compile
    compile_step: bool = setting(False, "compile the whole step (forward, loss, gradients, optimizer update) as one "
                                        "graph, train.compile_mode applying; needs optim.name sgd, or muon with "
                                        "muon_impl = \"batched\", no grad_clip, on_nonfinite = \"stop\"")
    ema_decay: float = setting(0.0, "weight EMA decay per step (e.g. 0.999); the EMA weights are validated and "
                                    "saved in best.pt; 0 = off")
    sync_bn: bool = setting(False, "SyncBatchNorm across ranks under torchrun (CUDA)")
    pack: int | Literal["all"] = setting(1, "k-fold: folds trained at once by one stacked model (fastcifar.pack), "
                                         "each exactly as its solo run: 1 = one after another; K >= 2 = K at a "
                                         'time (folds 0..K-1, then the next K); "all" = every fold at once')

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
        check(self.pack == "all" or self.pack >= 1, "train.pack",
              f'must be >= 1 (1 = folds one after another) or "all", got {self.pack}')


@dataclass(frozen=True)
class EvalCfg:
    """Validation during training and the final evaluation."""

    batch_size: int = setting(1024, "images per evaluation batch")
    metric: Literal["val_acc", "val_loss"] = setting("val_acc", "picks best.pt and drives early stopping")
    figures: bool = setting(True, "write the PNG figures (curves, confusion, samples, predictions, mistakes, "
                                  "Grad-CAM) for every fold")
    gradcam_layer: str = setting("", "Grad-CAM's layer, a dotted module name (e.g. \"layer4.1.conv2\"); \"\" = "
                                     "the last conv layer")
    tta: Literal["none", "flip", "flip_translate", "flip_translate_mean"] = setting(
        "none", "test-time augmentation: average the logits of the image and its mirror (flip), plus 1-pixel "
                "shifts of both (flip_translate, airbench's weights 1/4, 1/4, 1/8 x 4; flip_translate_mean: the "
                "same six views at 1/6 each, Hiverge's)")
    # Hiverge: 0.25
    tta_fraction: float = setting(1.0, "only this fraction of the evaluated images, the least confident by the plain "
                                       "view's softmax maximum, gets the TTA views; 1 = all (evaluation only: "
                                       "predict and export apply every view)")
    # With 6-view TTA a speed run's validation costs ~40 % of a training epoch's FLOPs: a run of seconds needs
    # it once.
    every: int = setting(1, "validate after every n-th epoch and always after the last (0: the last only); "
                            "best.pt and early stopping see validated epochs only")

    def validate(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.every >= 0, "eval.every", f"must be >= 0 (0 = after the last epoch only), got {self.every}")
        check(0.0 < self.tta_fraction <= 1.0, "eval.tta_fraction", f"must be in (0, 1], got {self.tta_fraction}")
