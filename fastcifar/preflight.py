"""Everything a run can be refused for, checked before its directory is created or touched.

A check that could only fail hours later (a Grad-CAM layer that does not exist, a fold without a full batch, a
model that cannot take the store's image size) fails here instead, in one line naming the recipe key, so no
half-made run folder is left behind and no training time is lost.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcifar.augment import build_eval_transform, build_train_transform
from fastcifar.backends import check_loader
from fastcifar.backends.ffcv import check_beton, default_beton
from fastcifar.context import RunPlan
from fastcifar.data import Store, open_store, store_stats
from fastcifar.device import recipe_amp_dtype
from fastcifar.errors import DataError, FastCifarError, RecipeError, first_line
from fastcifar.gradcam import get_layer
from fastcifar.models import build_model, create_model, model_entry
from fastcifar.ownership import check_own_dir, legacy_run
from fastcifar.recipe import Recipe, load_recipe, recipe_diff
from fastcifar.runfiles import trained_on
from fastcifar.splits import Fold, make_folds, take_per_class
from fastcifar.step import make_scaler
from fastcifar.stores import locate_store
from fastcifar.tblog import check_tensorboard

# Keys that may differ when a run is resumed: where it runs does not change what it computes.
RESUMABLE_DIFFS = {"train.device", "train.threads"}
BYTES_PER_PARAM = 16  # fp32 weights + gradients + two optimizer moments (Adam); SGD with momentum needs 12


def resolve_stats(recipe: Recipe, store: Store) -> Recipe:
    """The recipe with data.mean / data.std = "auto" replaced by the store's training statistics."""
    if recipe.data.mean != "auto" and recipe.data.std != "auto":
        return recipe
    stats = store_stats(store)
    data = replace(recipe.data, mean=tuple(stats["mean"]) if recipe.data.mean == "auto" else recipe.data.mean,
                   std=tuple(stats["std"]) if recipe.data.std == "auto" else recipe.data.std)
    return replace(recipe, data=data)


def check_inputs(recipe: Recipe, run_dir: Path, resume: bool = False, device: torch.device | None = None, *,
                 check_dir: bool = True) -> RunPlan:
    """All pre-run checks, as the plan the run consumes: the recipe with the store's statistics filled in
    (data.mean / data.std = "auto"), the opened, hash-verified store, the folds, the .beton. `check_dir`: also
    check `run_dir` may hold this run (new, empty, or this run with --resume on the same data); a DDP rank other
    than 0 leaves that to rank 0."""
    device = device or torch.device("cpu")
    # data.store from here or under $FASTCIFAR_DATA; the store's absolute path is what the run records
    store = open_store(locate_store(recipe.data.store), verify=True)  # hashes: ~0.3 s for the 184 MB store
    recipe = resolve_stats(recipe, store)
    check_loader(recipe)  # a missing DALI / FFCV extra, or an augment section the loader cannot express
    check_tensorboard(recipe)
    if len(store.classes) < 2:
        raise DataError(f"data.store: {store.path} holds {len(store.classes)} class; a classifier needs at least 2")
    check_model(recipe, store, device)
    if recipe.train.pack != 1:
        check_pack(recipe, store, device)
    check_augment(recipe, store)
    folds = check_folds(recipe, store)
    if recipe.split.kind == "kfold" and recipe.split.fold >= 0:
        folds = [folds[recipe.split.fold]]
    # The .beton must exist (and match the store) before the run folder does.
    beton = check_beton(default_beton(store.path), store) if recipe.train.loader == "ffcv" else None
    plan = RunPlan(recipe, store, device, Path(run_dir), resume, tuple(folds), beton)
    if check_dir:
        check_run_dir(plan.run_dir, recipe, resume, store)
    return plan


def check_distributed(recipe: Recipe, world: int, device: torch.device, folds_parallel: bool) -> None:
    """What a multi-process run cannot do, refused in one line before anything starts."""
    tr = recipe.train
    if folds_parallel:
        if recipe.split.kind != "kfold" or recipe.split.fold != -1:
            raise RecipeError('split.kind: --folds-parallel trains whole folds side by side; it needs split.kind = '
                              f'"kfold" and split.fold = -1, got kind = "{recipe.split.kind}", fold = '
                              f"{recipe.split.fold}")
        return
    if tr.compile_step:
        raise RecipeError("train.compile_step: not under DDP (its gradient all-reduce runs in .backward() hooks; "
                          "the compiled step takes torch.autograd.grad); set train.compile_step = false")
    if tr.pack != 1:
        raise RecipeError("train.pack: DDP trains one model on every rank; packing composes with --folds-parallel "
                          "(each rank packs its own folds), or set train.pack = 1")
    if tr.batch_size % world:
        raise RecipeError(f"train.batch_size: {tr.batch_size} is not divisible by the world size {world}; each "
                          f"rank trains batch_size / world_size images per step")
    if tr.loader != "device":
        raise RecipeError(f'train.loader: DDP shards the batches of the "device" loader only, got "{tr.loader}"')
    if tr.oom_retry:
        raise RecipeError("train.oom_retry: not supported under DDP (an out-of-memory retry on one rank would "
                          "change its number of gradient all-reduces); lower train.batch_size instead")
    if tr.sync_bn and not model_entry(recipe.model.name).sync_bn:  # its BatchNorm is not torch's plain one
        raise RecipeError(f"train.sync_bn: {recipe.model.name}'s scale-free BatchNorm keeps its shift in its own "
                          "parameter, which SyncBatchNorm would drop; set train.sync_bn = false")
    if tr.sync_bn and device.type != "cuda":
        raise RecipeError("train.sync_bn: SyncBatchNorm runs on CUDA only (torch has no CPU kernel for it)")


def check_folds(recipe: Recipe, store: Store) -> list[Fold]:
    """All folds of the split, each with validation images and at least one full training batch; k-fold needs
    at least k images of every class in its pool (else some folds would validate on classes they never saw, or
    on nothing)."""
    labels = store.labels
    split = recipe.split
    if split.kind == "kfold":
        pool = labels if split.pool == "train+test" else store.train_labels
        counts = np.bincount(pool, minlength=len(store.classes))
        c = int(counts.argmin())
        if counts[c] < split.k:
            raise RecipeError(f"split.k: {split.k} folds need at least {split.k} images of every class in the pool, "
                              f"but class '{store.classes[c]}' has {counts[c]}; lower split.k")
    folds = make_folds(len(store.train_labels), labels, split)
    for fold in folds:
        train = fold.train
        if recipe.data.train_subset:
            train = take_per_class(train, labels, recipe.data.train_subset)
        if len(fold.val) == 0:
            raise RecipeError(f"split.val_fraction: {split.val_fraction} holds out no image of the "
                              f"{len(labels)}; raise it")
        if len(train) < recipe.train.batch_size:
            raise RecipeError(f"train.batch_size: {recipe.train.batch_size} is more than fold {fold.index}'s "
                              f"{len(train)} training images (no full batch to train on); lower it")
        check_steps(recipe, len(train) // recipe.train.batch_size, fold.index)
    return folds


def check_steps(recipe: Recipe, steps_per_epoch: int, fold: int = 0) -> None:
    """train.steps ends inside the last of train.epochs: after more than epochs - 1 whole epochs, at most all."""
    tr = recipe.train
    if tr.steps and not (tr.epochs - 1) * steps_per_epoch < tr.steps <= tr.epochs * steps_per_epoch:
        need = -(-tr.steps // steps_per_epoch)
        raise RecipeError(f"train.steps: {tr.steps} steps at fold {fold}'s {steps_per_epoch} steps an epoch end in "
                          f"epoch {need}; set train.epochs = {need}, got {tr.epochs}")


def check_pack(recipe: Recipe, store: Store, device: torch.device, folds: bool = True) -> None:
    """What packing (train.pack, sweep --pack) cannot do yet, refused in one line naming the key; then two copies
    of the model are packed on the CPU and run one batch (a layer the pack cannot stack fails here). `folds`:
    train.pack packs the folds of one k-fold run."""
    from fastcifar.pack import PackedNet, stack_inputs  # imports the models: only when packing

    split, m, tr = recipe.split, recipe.model, recipe.train
    if folds and (split.kind != "kfold" or split.fold != -1):
        raise RecipeError(f'train.pack: packs the folds of a k-fold run; it needs split.kind = "kfold" and split.fold '
                          f'= -1, got kind = "{split.kind}", fold = {split.fold}')
    entry = model_entry(m.name)
    if not entry.stackable:
        raise RecipeError(f"model.name: {m.name} cannot be packed (a layer of it is not one fastcifar.pack stacks: "
                          "convolutions, BatchNorm, linear, pooling, pointwise); set train.pack = 1")
    if m.dropout:
        raise RecipeError(f"model.dropout: {m.dropout} cannot be packed (each fold would need the dropout masks of its "
                          "solo run); set model.dropout = 0 or train.pack = 1")
    refusals = {
        "train.loader": (tr.loader != "device", f'packed folds train from the "device" loader, got "{tr.loader}"'),
        "train.oom_retry": (tr.oom_retry, "not with packing (a micro-batch retry would split every fold); lower "
                                          "train.batch_size or train.pack"),
        "train.cuda_graphs": (tr.cuda_graphs, "not with packing yet; train.compile with compile_mode = "
                                              '"reduce-overhead" records the compiler\'s CUDA graphs of the pack'),
        "train.amp": (make_scaler(recipe_amp_dtype(tr, device), device) is not None,
                      "fp16 loss scaling (this GPU has no bf16) is not supported with packing; set train.amp = false"),
        # the packed step is one forward and backward for every fold, then each fold's own eager update
        "train.compile_step": (tr.compile_step, "not with packing (the compiled step is one fold's forward, backward "
                                                "and update); set train.compile_step = false or train.pack = 1"),
        "train.steps": (tr.steps != 0, "not with packing yet (a fold's last epoch would end mid-epoch, inside the "
                                       "pack); set train.steps = 0 or train.pack = 1"),
    }
    if tr.amp == "auto" and device.type == "cpu":  # the probe times one fold's model, not the pack
        raise RecipeError('train.amp: "auto" on the CPU measures each fold\'s model alone, not the pack; set '
                          "train.amp = true or false with packing")
    for key, (refused, why) in refusals.items():
        if refused:
            raise RecipeError(f"{key}: {why}")
    size = recipe.augment.resize or int(store.train_images.shape[1])
    copies = [build_model(recipe, len(store.classes), int(store.train_images.shape[1]), torch.device("cpu"),
                          pretrained=False) for _ in range(2)]
    net = PackedNet(copies)
    net.bind()
    x = torch.zeros(2, 3, size, size).to(memory_format=torch.channels_last if tr.channels_last else
                                          torch.contiguous_format)
    try:
        with torch.no_grad():
            out = net(stack_inputs([x, x]))
    except RuntimeError as e:
        raise RecipeError(f"model.name: {m.name} cannot be packed ({first_line(e)}); set train.pack = 1") from None
    if tuple(out.shape) != (2, 2 * len(store.classes)):
        raise RecipeError(f"model.name: {m.name} packed gives outputs of shape {list(out.shape)}, not (batch, 2 x "
                          f"{len(store.classes)} classes); set train.pack = 1")


def check_augment(recipe: Recipe, store: Store) -> None:
    """Run the train and eval transforms once on two stored images (CPU): an augment setting the image size
    does not allow (reflect padding wider than the image, ...) fails here, not at the first step."""
    images = torch.from_numpy(np.array(store.train_images[:2]))  # a writable copy of two memory-mapped images
    rows = torch.arange(len(images))
    mean, std = recipe.data.mean, recipe.data.std
    aug = recipe.augment
    for transform in (build_train_transform(aug, mean, std), build_eval_transform(aug, mean, std)):
        transform(images, rows, torch.Generator().manual_seed(0), 0)


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None


def _param_count(recipe: Recipe, num_classes: int, size: int) -> int | None:
    """Parameters counted on the meta device (nothing allocated), or None where a model cannot be built there."""
    m = recipe.model
    try:
        with torch.device("meta"):
            model = create_model(m.name, num_classes=num_classes, image_size=size, width=m.width, dropout=m.dropout)
    except Exception:  # noqa: BLE001 - an estimate only: the real build below still refuses in one line
        return None
    return sum(p.numel() for p in model.parameters())


def check_model(recipe: Recipe, store: Store, device: torch.device) -> None:
    """Build the model on the CPU (a bad width or pretrained file fails here), run one 2-image batch of the
    store's (resized) image size through it, and check the Grad-CAM layer yields a feature map."""
    m, num_classes, size = recipe.model, len(store.classes), int(store.train_images.shape[1])
    key = "model.width" if m.width else "model.name"
    params, memory = _param_count(recipe, num_classes, size), _memory_bytes(device)
    if params is not None and memory is not None and params * BYTES_PER_PARAM > memory:
        raise RecipeError(f"{key}: {m.name} with width {m.width} has {params:,} parameters, "
                          f"{params * BYTES_PER_PARAM / 2**30:,.0f} GiB to train, more than the "
                          f"{memory / 2**30:,.0f} GiB of {device.type}; lower it")
    try:
        model = build_model(recipe, num_classes, size, torch.device("cpu"))
    except (RuntimeError, MemoryError) as e:
        raise RecipeError(f"{key}: {m.name} cannot be built ({first_line(e)})") from None
    side = recipe.augment.resize or size
    feature = _gradcam_probe(model, recipe)
    model.eval()
    x = torch.zeros(2, 3, side, side).to(memory_format=torch.channels_last if recipe.train.channels_last
                                         else torch.contiguous_format)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        raise DataError(f"model.name: {m.name} cannot take the store's {side}x{side} images ({first_line(e)}); "
                        "pick another model or set augment.resize") from None
    finally:
        if feature.get("hook") is not None:
            feature["hook"].remove()
    if tuple(out.shape) != (2, num_classes):
        raise DataError(f"model.name: {m.name} gives outputs of shape {list(out.shape)} for {side}x{side} images, "
                        f"not (batch, {num_classes} classes)")
    if "shape" in feature and len(feature["shape"]) != 4:
        raise RecipeError(f"eval.gradcam_layer: {recipe.eval.gradcam_layer!r} outputs {feature['shape']}, not a "
                          "(N, C, H, W) feature map; pick a conv layer")


def _gradcam_probe(model: torch.nn.Module, recipe: Recipe) -> dict:
    """A forward hook recording the output shape of eval.gradcam_layer (a RecipeError listing the conv layers
    when the name does not exist). Only checked when figures are on: Grad-CAM is one of them."""
    seen: dict = {}
    if not (recipe.eval.figures and recipe.eval.gradcam_layer):
        return seen
    layer = get_layer(model, recipe.eval.gradcam_layer)

    def record(module, inputs, output) -> None:
        seen["shape"] = list(output.shape) if isinstance(output, torch.Tensor) else [type(output).__name__]

    seen["hook"] = layer.register_forward_hook(record)
    return seen


# ---------------------------------------------------------------------------------------------- the run folder


def recheck_run_dir(plan: RunPlan) -> bool:
    """check_run_dir again, under the run lock (fastcifar.run.start_run): between preflight and the lock another
    process may have started, finished or removed a run in the folder. True when resuming."""
    return check_run_dir(plan.run_dir, plan.recipe, plan.resume, plan.store)


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, store: Store) -> bool:
    """True if run_dir already holds this run; refuse a folder fastcifar did not write, two different recipes in
    one directory, and a resume on data other than the run was trained on."""
    check_own_dir(run_dir, "run", legacy_run)
    saved = run_dir / "recipe.toml"
    if not saved.exists():
        return False
    if not resume:
        raise FastCifarError(f"{run_dir}: already holds a run; pass --resume to continue it, or --out NEW_DIR")
    # The data first: other data also changes "auto" statistics, and that is not the recipe's doing.
    check_same_data(trained_on(run_dir), data_identity(store), run_dir)
    diff = [k for k in recipe_diff(load_recipe(saved), recipe) if k not in RESUMABLE_DIFFS]
    if diff:
        raise RecipeError(f"{diff[0]}: differs from the run's saved {saved}; resume with that recipe "
                          f"(fastcifar train {saved} --out {run_dir} --resume)")
    return True


def data_identity(store: Store) -> dict[str, Any]:
    """What a run was trained on, as data.json records it: a resume or evaluation on other data is refused."""
    return {"store": str(store.path), "classes": list(store.classes),
            "image_shape": list(store.train_images.shape[1:]), "sha256": dict(store.meta["sha256"])}


def _describe(key: str, ident: dict[str, Any], other: dict[str, Any]) -> str:
    if key == "classes":
        names = ident["classes"]
        return f"{len(names)} classes [{', '.join(map(str, names[:6]))}{', …' if len(names) > 6 else ''}]"
    if key == "image_shape":
        return "x".join(map(str, ident["image_shape"])) + " images"
    changed = sorted(k for k in ident["sha256"] if ident["sha256"].get(k) != other["sha256"].get(k))[:1] or ["?"]
    return f"{changed[0]} with sha256 {str(ident['sha256'].get(changed[0]))[:12]}…"


def check_same_data(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> None:
    """One line naming both sides when the store differs from the one the run was trained on."""
    for key in ("classes", "image_shape", "sha256"):
        if key in saved and saved[key] != now[key]:
            raise DataError(f"data.store: {now['store']} holds {_describe(key, now, saved)}, but {run_dir} was "
                            f"trained on {_describe(key, saved, now)} ({saved.get('store', 'its store')}); resume "
                            "with that store, or train into a new --out")
