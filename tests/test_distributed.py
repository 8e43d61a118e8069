"""DDP and fold-parallel training on the CPU (gloo), two ranks as forked processes.

The ranks are forked from the test process (torch is already imported there; a spawned or torchrun-launched
worker re-imports it, ~10 s a process on a busy 2-core machine) and join the group exactly as under torchrun:
from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, through `fastcifar.cli.main` and
`run_distributed`. The strict checks use a model without BatchNorm: under DDP each rank normalises with its own
slice's statistics (and, without train.sync_bn, keeps its own running statistics), so a BN model is not
expected to match a single process at the same global batch; SyncBatchNorm has no CPU kernel to test here.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp
from rich.console import Console

from conftest import tiny_table
from fastcifar.augment import build_train_transform
from fastcifar.checkpoint import load_checkpoint
from fastcifar.cli import main
from fastcifar.context import Hooks
from fastcifar.lifecycle import Interrupted
from fastcifar.loader import DeviceLoader
from fastcifar.recipe import AugmentCfg, recipe_from_dict, recipe_to_toml
from fastcifar.run import run_training

QUIET = Console(quiet=True)
TIME_COLUMNS = ("epoch_time_s", "img_per_s", "train_time_s")
STOP_AT = (1, 2)  # rank 0 alone gets a SIGINT in epoch 2 after step 3 (0-based epoch, step)


def _ddp_table(store: Path) -> dict:
    # No BatchNorm and no dropout: two ranks then compute exactly what one process does at the same batch.
    # lr 0.2: the BN-free CNN moves off chance (val acc ~0.3 after 2 epochs), so the weights really change.
    return tiny_table(store, model={"name": "cnn", "width": 8}, augment={"erasing_p": 0.5}, optim={"lr": 0.2},
                      schedule={"name": "cosine", "warmup_epochs": 1.0}, train={"epochs": 2, "threads": 1})


def _folds_table(store: Path) -> dict:
    # BatchNorm is fine here: each fold is an ordinary single-process run on its rank.
    return tiny_table(store, split={"kind": "kfold", "k": 3}, train={"epochs": 2, "threads": 1})


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _audit_writes(watched: list[Path], found: list[str]) -> None:
    """Record every file or directory this process creates, writes, renames or removes under `watched`."""
    roots = [str(p) for p in watched]

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:
            path, writing = args[0], event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir")
        if writing and isinstance(path, (str, os.PathLike)) and str(path).startswith(tuple(roots)):
            found.append(f"{event} {path}")

    sys.addaudithook(hook)


def _rank_worker(rank: int, world: int, ports: list[int], root: str) -> None:
    """One rank: a DDP run through the CLI, a DDP run stopped by a signal on rank 0 and resumed, and a
    fold-parallel run through the CLI. Rank 1 records anything it writes under the DDP run directories."""
    root_p = Path(root)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    ports_left = iter(ports)
    writes: list[str] = []
    if rank:
        _audit_writes([root_p / "ddp", root_p / "cut"], writes)

    os.environ["MASTER_PORT"] = str(next(ports_left))
    assert main(["train", str(root_p / "ddp.toml"), "--out", str(root_p / "ddp")]) == 0

    from fastcifar.distributed import run_distributed

    recipe = recipe_from_dict(json.loads((root_p / "ddp.json").read_text()))

    def on_step(epoch: int, step: int) -> None:
        if rank == 0 and (epoch, step) == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)  # rank 1 learns of it only through the stop agreement

    os.environ["MASTER_PORT"] = str(next(ports_left))
    try:
        run_distributed(recipe, root_p / "cut", QUIET, hooks=Hooks(on_step=on_step))
        raise AssertionError("the signalled run did not stop")
    except Interrupted as e:
        assert rank == 0 and e.exit_code == 128 + signal.SIGINT
    except SystemExit as e:  # ranks other than 0 exit quietly; rank 0 reports
        assert rank == 1 and e.code == 128 + signal.SIGINT
    os.environ["MASTER_PORT"] = str(next(ports_left))
    run_distributed(recipe, root_p / "cut", QUIET, resume=True)

    os.environ["MASTER_PORT"] = str(next(ports_left))
    assert main(["train", str(root_p / "folds.toml"), "--out", str(root_p / "folds"), "--folds-parallel"]) == 0
    (root_p / f"writes{rank}.json").write_text(json.dumps(writes))


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> Path:
    """Two forked ranks run the DDP and fold-parallel jobs; the test process runs their single-process twins."""
    root = tmp_path_factory.mktemp("dist")
    for name, table in (("ddp", _ddp_table(store)), ("folds", _folds_table(store))):
        (root / f"{name}.toml").write_text(recipe_to_toml(recipe_from_dict(table)))
        (root / f"{name}.json").write_text(json.dumps(table))
    tmp_mp.start_processes(_rank_worker, args=(2, _free_ports(4), str(root)), nprocs=2, start_method="fork")
    run_training(recipe_from_dict(_ddp_table(store)), root / "single", QUIET)
    run_training(recipe_from_dict(_folds_table(store)), root / "sequential", QUIET)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def _weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / f"{name}.pt")["model"]


def test_two_ranks_match_one_process_at_the_same_global_batch(runs):
    single, ddp = _rows(runs / "single" / "metrics.csv"), _rows(runs / "ddp" / "metrics.csv")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp):
        assert a.keys() == b.keys()
        for k in a:
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-6), (a["epoch"], k)
    one, two = _weights(runs / "single"), _weights(runs / "ddp")
    assert one.keys() == two.keys()  # plain state-dict keys: no "module." prefix from the DDP wrapper
    # The same images, augmentations and steps; only float32 summation order differs (the mean of two
    # half-batch means instead of one mean): measured max |diff| 3e-6 on weights of magnitude ~0.2 after 14
    # steps at lr 0.2. A wrong slice, permutation or gradient scale would differ by orders of magnitude more.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=2e-5, msg=k)
    s1 = json.loads((runs / "single" / "summary.json").read_text())
    s2 = json.loads((runs / "ddp" / "summary.json").read_text())
    assert s2["test_acc_mean"] == pytest.approx(s1["test_acc_mean"]) and s2.keys() == s1.keys()
    env = json.loads((runs / "ddp" / "env.json").read_text())
    assert env["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo"}


def test_only_rank_0_writes_the_ddp_run(runs):
    assert json.loads((runs / "writes1.json").read_text()) == []
    rel = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))  # noqa: E731
    assert rel(runs / "ddp") == rel(runs / "single")


def test_a_signal_on_one_rank_stops_all_and_the_resumed_run_is_exact(runs):
    """Rank 0 alone is signalled mid-epoch; both ranks stop after the same step (else rank 1 would wait in a
    gradient all-reduce forever), the checkpoint keeps both ranks' partial totals, and the resumed run ends
    with the uninterrupted run's weights and metrics."""
    full, cut = _weights(runs / "ddp"), _weights(runs / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    assert _rows(runs / "cut" / "metrics.csv") == _rows(runs / "ddp" / "metrics.csv")


def test_folds_parallel_matches_sequential_folds(runs):
    seq, par = runs / "sequential", runs / "folds"
    a, b = (json.loads((d / "summary.json").read_text()) for d in (seq, par))
    assert a.keys() == b.keys() and [f["fold"] for f in b["folds"]] == [0, 1, 2]
    for fa, fb in zip(a["folds"], b["folds"]):
        for k in ("val_acc", "val_loss", "test_acc", "test_loss", "best_epoch"):
            assert fb[k] == pytest.approx(fa[k], rel=1e-5, abs=1e-6), (fa["fold"], k)
    for i in range(3):
        assert _rows(par / f"fold{i}" / "metrics.csv") == _rows(seq / f"fold{i}" / "metrics.csv")
    drop_time = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731
    assert drop_time((par / "folds.csv").read_text()) == drop_time((seq / "folds.csv").read_text())
    metrics_part = lambda run: (run / "report.md").read_text().split("## Final metrics")[1]  # noqa: E731
    assert metrics_part(par) == metrics_part(seq)  # the report's metric and fold tables (above it: timings)
    assert json.loads((par / "env.json").read_text())["distributed"]["mode"] == "folds_parallel"


def test_sharded_batches_are_slices_of_the_global_batch():
    """Draw global, slice: rank r's batch is rows [r*B/W, (r+1)*B/W) of the one-process batch, augmentation
    included, epoch after epoch."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 40)
    tf = build_train_transform(AugmentCfg(crop_padding=2, erasing_p=0.5, cutout=3), (0.5,) * 3, (0.25,) * 3)
    make = lambda: DeviceLoader(images, labels, 8, tf, torch.device("cpu"), shuffle=True, seed=3)  # noqa: E731
    whole, shards = make(), [make(), make()]
    for r, loader in enumerate(shards):
        loader.shard = (r, 2)
    assert shards[0].num_images == whole.num_images // 2
    for _ in range(2):
        epoch = [list(loader) for loader in (whole, *shards)]  # each runs its epoch to the end
        assert len(epoch[0]) == len(epoch[1]) == len(epoch[2]) == 5
        for (x, y), (x0, y0), (x1, y1) in zip(*epoch):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
            assert x0.is_contiguous(memory_format=torch.channels_last)
    assert shards[1].state_dict()["generator"].equal(whole.state_dict()["generator"])


@pytest.mark.parametrize("env, args, message", [
    (None, ["--folds-parallel"], "launch it with torchrun"),
    ({}, ["--set", "train.batch_size=32"], "train.batch_size: 32 is not divisible by the world size 3"),
    ({}, ["--set", "train.sync_bn=true"], "train.sync_bn: SyncBatchNorm runs on CUDA only"),
    ({}, ["--set", "train.oom_retry=true"], "train.oom_retry: not supported under DDP"),
    ({}, ["--folds-parallel"], "it needs split.kind = \"kfold\""),
], ids=["folds-parallel-without-torchrun", "indivisible-batch", "sync-bn-on-cpu", "oom-retry", "not-kfold"])
def test_bad_distributed_setups_are_refused_in_one_line(store, tmp_path, capsys, monkeypatch, env, args, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store, train={"batch_size": 48}))))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    if env is not None:  # looks launched by torchrun with 3 ranks; refused before any process group exists
        for k, v in dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
            monkeypatch.setenv(k, v)
    code = main(["train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_sync_bn_is_refused_for_speedrun_net(tiny):
    # convert_sync_batchnorm would replace ShiftBatchNorm by a plain SyncBatchNorm and lose its learned shifts.
    import torch

    from fastcifar.errors import RecipeError
    from fastcifar.preflight import check_distributed

    recipe = tiny(model={"name": "speedrun_net", "width": 8}, train={"sync_bn": True})
    with pytest.raises(RecipeError, match=r"^train\.sync_bn: speedrun_net's scale-free BatchNorm"):
        check_distributed(recipe, 2, torch.device("cuda"), False)


@pytest.mark.parametrize("name", ["speedrun_net95", "speedrun_net96"])
def test_sync_bn_is_refused_for_the_other_speedrun_nets(tiny, name):
    # The same ShiftBatchNorm: the refusal follows the registry entry (models.ModelEntry.sync_bn), not the name.
    import torch

    from fastcifar.errors import RecipeError
    from fastcifar.preflight import check_distributed

    recipe = tiny(model={"name": name, "width": 8}, train={"sync_bn": True})
    with pytest.raises(RecipeError, match=rf"^train\.sync_bn: {name}'s scale-free BatchNorm"):
        check_distributed(recipe, 2, torch.device("cuda"), False)


def _packed_folds_table(store: Path, pack) -> dict:
    # 4 folds, 2 ranks, 2 folds packed on each; speedrun_net with Lookahead and EMA: every per-fold part counts.
    return tiny_table(store, split={"kind": "kfold", "k": 4}, model={"name": "speedrun_net", "width": 8},
                      optim={"lookahead_every": 2}, train={"epochs": 2, "threads": 1, "pack": pack, "ema_decay": 0.9})


def _record_steps(root: Path, tag: str):
    """Record every fold's step losses, and which folds trained packed; the function returned writes them to
    root/steps-<tag>.json."""
    from fastcifar import fold_run, pack_train, train
    from fastcifar.step import StepRunner

    losses: dict[int, list[float]] = {}
    owner: dict[int, int] = {}
    packed: list[int] = []
    real_build, real_after = fold_run.build_fold, StepRunner.after_backward

    def build(ctx, fold, saved=None, packed_fold=False):
        run = real_build(ctx, fold, saved)
        owner[id(run.step)] = fold.index
        if packed_fold:
            packed.append(fold.index)
        return run

    def after(self, loss, correct, images, totals, step):
        losses.setdefault(owner[id(self)], []).append(float(loss))
        return real_after(self, loss, correct, images, totals, step)

    train.build_fold = build
    pack_train.build_fold = lambda ctx, fold, saved=None: build(ctx, fold, saved, packed_fold=True)
    StepRunner.after_backward = after
    return lambda: (root / f"steps-{tag}.json").write_text(json.dumps({"losses": losses, "packed": packed}))


def _packed_rank_worker(rank: int, world: int, port: int, root: str) -> None:
    root_p = Path(root)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    save = _record_steps(root_p, f"rank{rank}")
    assert main(["train", str(root_p / "packed.toml"), "--out", str(root_p / "packed"), "--folds-parallel"]) == 0
    save()


def _sequential_worker(_: int, root: str) -> None:
    """The single-process, unpacked twin, recording its step losses the same way (in a child: the patches stay
    out of the test process)."""
    root_p = Path(root)
    torch.set_num_threads(1)
    save = _record_steps(root_p, "seq")
    recipe = recipe_from_dict(json.loads((root_p / "sequential.json").read_text()))
    run_training(recipe, root_p / "sequential", QUIET)
    save()


def test_folds_parallel_packs_each_ranks_folds(store, tmp_path):
    """--folds-parallel with train.pack = 2: 4 folds over 2 ranks, each rank packing its own 2 (rank 0 folds 0
    and 2, rank 1 folds 1 and 3). Each fold's step losses are the sequential run's within 1e-5 relative over the
    first 3 steps (the pack tests' bound), its accuracies and best epoch equal and its losses within 1e-2 after 2
    epochs (test_pack's whole-run bound), and rank 0 writes the sequential run's files and folds table."""
    (tmp_path / "packed.toml").write_text(recipe_to_toml(recipe_from_dict(_packed_folds_table(store, 2))))
    (tmp_path / "sequential.json").write_text(json.dumps(_packed_folds_table(store, 1)))
    tmp_mp.start_processes(_packed_rank_worker, args=(2, _free_ports(1)[0], str(tmp_path)), nprocs=2,
                           start_method="fork")
    tmp_mp.start_processes(_sequential_worker, args=(str(tmp_path),), nprocs=1, start_method="fork")
    steps = {tag: json.loads((tmp_path / f"steps-{tag}.json").read_text()) for tag in ("rank0", "rank1", "seq")}
    assert steps["rank0"]["packed"] == [0, 2] and steps["rank1"]["packed"] == [1, 3] and steps["seq"]["packed"] == []
    par = {**steps["rank0"]["losses"], **steps["rank1"]["losses"]}
    seq = steps["seq"]["losses"]
    assert sorted(par) == sorted(seq) == ["0", "1", "2", "3"]
    for fold, solo in seq.items():
        assert len(par[fold]) == len(solo) == 2 * 5  # 180 training images a fold: 5 steps of 32 an epoch
        assert max(abs(a - b) / abs(b) for a, b in zip(par[fold][:3], solo[:3])) <= 1e-5, (fold, par[fold], solo)
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("sequential", "packed"))
    assert a.keys() == b.keys() and [f["fold"] for f in b["folds"]] == [0, 1, 2, 3]
    for fa, fb in zip(a["folds"], b["folds"]):
        assert (fb["val_acc"], fb["test_acc"], fb["best_epoch"]) == (fa["val_acc"], fa["test_acc"], fa["best_epoch"])
        for k in ("val_loss", "test_loss"):
            assert fb[k] == pytest.approx(fa[k], rel=1e-2), (fa["fold"], k)
    listing = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))  # noqa: E731
    assert listing(tmp_path / "packed") == listing(tmp_path / "sequential")
    rows = [line.split(",")[0] for line in (tmp_path / "packed" / "folds.csv").read_text().splitlines()]
    assert rows == ["fold", "0", "1", "2", "3", "mean", "std"]
    env = json.loads((tmp_path / "packed" / "env.json").read_text())
    assert env["distributed"] == {"mode": "folds_parallel", "world_size": 2}


def test_the_resume_hint_names_torchrun_and_folds_parallel(monkeypatch):
    """An interrupted fold-parallel run said "fastcifar train ... --resume": one process, not the run's ranks."""
    from types import SimpleNamespace

    from fastcifar.distributed import FoldsParallel

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    strategy = FoldsParallel(SimpleNamespace(rank=1, world=2))
    assert strategy.resume_command == "torchrun --nproc_per_node=2 -m fastcifar train --folds-parallel"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert FoldsParallel(SimpleNamespace(rank=0, world=2)).resume_command == \
        "torchrun --nnodes=2 (+ rendezvous options) --nproc_per_node=1 -m fastcifar train --folds-parallel"
