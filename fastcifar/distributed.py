"""Training on several processes through PyTorch's own engine: DDP under torchrun, and fold-parallel k-fold.

DDP (`torchrun --nproc_per_node=N -m fastcifar train RECIPE`): one process per device (cuda:LOCAL_RANK with
NCCL, or the CPU with gloo). Every rank holds the whole training split, draws the same permutation and the same
augmented global batch (train.batch_size) from the same seeded generator, and trains on its batch_size / W slice
(DeviceLoader.shard); DDP averages the gradients, so W ranks take the steps of one process at the global batch.
Rank 0's model is the run's model: every rank evaluates the validation set at the same time (no rank waits),
but rank 0's numbers are broadcast and drive best-checkpoint and early-stopping decisions everywhere, because
the other ranks' BatchNorm running statistics differ slightly (each updates them from its own last slice) and
rank 0's weights are what best.pt holds. Only rank 0 writes (checkpoints, metrics.csv, result.json, reports)
or prints; a resumed run loads rank 0's last.pt on every rank (a shared filesystem across nodes).

Fold-parallel (`--folds-parallel` under torchrun): rank r trains folds r, r+W, ... as ordinary single-process
runs on its own device. No process group exists: the ranks share only rank 0's go-ahead and their fold results,
through torchrun's key-value store (FoldBoard), so each run is exactly a sequential run's fold (CUDA graphs
included, which the engine turns off once a process group exists). Rank 0 then writes the same summary.json,
folds.csv and report.md as a sequential run.

Stopping: SIGINT/SIGTERM (torchrun forwards one to each worker) sets a flag; in DDP the ranks agree on it with
a MAX all-reduce every few steps, so all of them checkpoint after the same step and exit 128 + signal. A rank
that fails on its own makes torchrun SIGTERM the rest: a DDP rank blocked in a collective then gets an error
from gloo, or waits for torchrun's SIGKILL (30 s) under NCCL; no rank writes after a peer has failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from fastcifar.errors import FastCifarError, RecipeError
from fastcifar.lifecycle import GracefulStop, Interrupted, RunLock
from fastcifar.recipe import Recipe
from fastcifar.step import EpochTotals
from fastcifar.train import FoldTrainer

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Fold-parallel ranks meet only at the end; with 5 folds on 4 GPUs one rank trains a second fold while rank 0
# waits for it, far past the store's default 30 min. A rank that fails makes torchrun stop the others.
FOLDS_PARALLEL_TIMEOUT = timedelta(days=7)
# DDP stop agreement: an all-reduce of one int on the gloo side group, a host round trip that does not wait
# for the GPU. Every step on the CPU (steps take ~10 ms or more there); every 8th on CUDA, where a step can be a
# few ms, so a stop lands within 8 steps.
STOP_POLL = {"cpu": 1, "cuda": 8}


class PeerFailed(FastCifarError):
    """Raised on ranks other than 0 when rank 0 refused to start (rank 0 prints the reason)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # gloo group for host-side agreement (stop flag, objects); None = the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env(env: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (it sets all of TORCHRUN_VARS), else None."""
    env = os.environ if env is None else env
    if not all(k in env for k in TORCHRUN_VARS):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def rank_device(name: str, local_rank: int) -> torch.device:
    """The recipe's device for this rank: cuda:LOCAL_RANK (made current), or the CPU."""
    from fastcifar.device import resolve_device

    device = resolve_device(name)
    if device.type == "mps":
        raise RecipeError("train.device: 'mps' has no torch.distributed backend; use cuda or cpu under torchrun")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise FastCifarError(f"LOCAL_RANK {local_rank}: this node has {count} CUDA devices; start at most "
                                 f"{count} processes per node (torchrun --nproc_per_node={count})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # GradScaler("cuda"), bf16 checks and NCCL use the current device
    return device


def check_recipe(recipe: Recipe, world: int, device: torch.device, folds_parallel: bool) -> None:
    """What a multi-process run cannot do, refused in one line before anything starts."""
    tr = recipe.train
    if folds_parallel:
        if recipe.split.kind != "kfold" or recipe.split.fold != -1:
            raise RecipeError('split.kind: --folds-parallel trains whole folds side by side; it needs split.kind = '
                              f'"kfold" and split.fold = -1, got kind = "{recipe.split.kind}", fold = '
                              f"{recipe.split.fold}")
        return
    if tr.batch_size % world:
        raise RecipeError(f"train.batch_size: {tr.batch_size} is not divisible by the world size {world}; each "
                          f"rank trains batch_size / world_size images per step")
    if tr.loader != "device":
        raise RecipeError(f'train.loader: DDP shards the batches of the "device" loader only, got "{tr.loader}"')
    if tr.oom_retry:
        raise RecipeError("train.oom_retry: not supported under DDP (an out-of-memory retry on one rank would "
                          "change its number of gradient all-reduces); lower train.batch_size instead")
    if tr.sync_bn and recipe.model.name == "speedrun_net":  # convert_sync_batchnorm rebuilds plain BatchNorms
        raise RecipeError("train.sync_bn: speedrun_net's scale-free BatchNorm keeps its shift in its own parameter, "
                          "which SyncBatchNorm would drop; set train.sync_bn = false")
    if tr.sync_bn and device.type != "cuda":
        raise RecipeError("train.sync_bn: SyncBatchNorm runs on CUDA only (torch has no CPU kernel for it)")


@contextlib.contextmanager
def process_group(device: torch.device, local_rank: int,
                  timeout: timedelta | None = None) -> Iterator[DistContext]:
    """Join torchrun's group from its environment (env://): NCCL on CUDA, gloo on the CPU.

    A group that already exists (a test that set one up) is used as is and left alone. The group is destroyed
    on a clean exit or a graceful stop; after any other failure a peer may be dead, and destroying an NCCL
    group then can block, so the process just exits.
    """
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() == "nccl" else None
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, control)
    clean = False
    try:
        yield ctx
        clean = True
    except Interrupted:
        clean = True
        raise
    finally:
        if owned and clean:
            dist.destroy_process_group()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


SUMMED_COUNTS = ("seen", "skipped", "warmup_seen")  # EpochTotals' image / step counters


def reduce_totals(totals: EpochTotals, ctx: DistContext) -> EpochTotals:
    """The whole world's epoch totals: loss, correct and the counters summed (one all-reduce per epoch); the
    times stay this rank's (the ranks step in lockstep), so img/s is the world's throughput."""
    counts = [f for f in SUMMED_COUNTS if hasattr(totals, f)]
    dev = totals.loss_sum.device
    packed = torch.cat([totals.loss_sum.double().reshape(1), totals.correct.double().reshape(1),
                        torch.tensor([float(getattr(totals, f)) for f in counts], device=dev, dtype=torch.float64)])
    dist.all_reduce(packed)  # float64 counts are exact below 2**53
    summed = {f: int(v) for f, v in zip(counts, packed[2:].tolist())}
    return dataclasses.replace(totals, loss_sum=packed[0].clone(), correct=packed[1].round().long(), **summed)


class AgreedStop:
    """GracefulStop seen by all DDP ranks alike: `requested` (read once per step by the trainer) all-reduces
    the signal number every `every` reads, so every rank stops after the same step even when the signal
    reached them at different steps, and none is left waiting in a gradient all-reduce."""

    def __init__(self, stop: GracefulStop, ctx: DistContext, every: int):
        self.stop, self.ctx, self.every = stop, ctx, every
        self.signum: int | None = None
        self._reads = 0

    @property
    def requested(self) -> bool:
        if self.signum is None:
            self._reads += 1
            if self._reads % self.every == 0:
                flag = torch.tensor([self.stop.signum or 0], dtype=torch.int64)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.control)
                self.signum = int(flag) or None
        return self.signum is not None


def offset_rng(rank: int) -> None:
    """Dropout (and any other in-model randomness) gets its own stream on each rank other than 0, drawn from
    the seeded state, so a run (and its resume from rank 0's checkpoint) stays a function of the seed."""
    if rank:
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank)


class DDPFoldTrainer(FoldTrainer):
    """A FoldTrainer for one DDP rank: sharded loader, DDP-wrapped model, world-wide totals, rank-0 writes."""

    def __init__(self, ctx: DistContext, recipe: Recipe, store, fold, fold_dir: Path, device: torch.device,
                 console):
        self.ctx, self._converted = ctx, False
        super().__init__(recipe, store, fold, fold_dir, device, console)
        from fastcifar.loader import DeviceLoader

        train = self.data.train
        if not isinstance(train, DeviceLoader):
            raise RecipeError(f'train.loader: DDP shards the batches of the "device" loader only, got '
                              f'"{recipe.train.loader}"')
        if train.batch_size % ctx.world:
            raise RecipeError(f"train.batch_size: the training set holds only {train.batch_size} images, not "
                              f"divisible by the world size {ctx.world}")
        train.shard = (ctx.rank, ctx.world)
        offset_rng(ctx.rank)

    def _set_stage(self, stage: int) -> None:
        if not self._converted:  # first call, from FoldTrainer.__init__: the model exists, its optimizer not yet
            if self.recipe.train.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # keeps the Parameters
            self._converted = True
        super()._set_stage(stage)
        # DDP hooks the parameters that require grad when it is built; a fine-tuning stage change flips
        # requires_grad, so each stage gets its own wrapper (which also re-broadcasts rank 0's weights).
        ids = [self.device.index] if self.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=False,
                                                        gradient_as_bucket_view=True)
        plan = self.engine.plan
        if plan.compile:  # compile(DDP(model)), the order torch's DDPOptimizer splits at gradient buckets
            from fastcifar.engine import compile_model

            net = compile_model(net, plan.compile_mode)
        self.runner.model = self.ddp = net

    def _train_epoch(self, epoch: int, hooks, progress, stop) -> EpochTotals:
        if self.runner.model is not self.ddp:  # gradients would silently stop being averaged across ranks
            raise FastCifarError("internal: the train step no longer calls the DDP-wrapped model")
        return reduce_totals(super()._train_epoch(epoch, hooks, progress, stop), self.ctx)

    def _end_epoch(self, row: dict[str, float]) -> bool:
        return super()._end_epoch(broadcast_object(row, self.ctx))

    def save_last(self, partial: EpochTotals | None = None) -> None:
        if partial is not None:  # every rank stops after the same step (AgreedStop), so all of them get here
            partial = reduce_totals(partial, self.ctx)
        if self.ctx.is_main:
            super().save_last(partial)

    def save_best(self, row: dict[str, float]) -> None:
        if self.ctx.is_main:
            super().save_best(row)

    def write_metrics(self) -> None:
        if self.ctx.is_main:
            super().write_metrics()

    def try_resume(self) -> bool:
        resumed = super().try_resume()
        if resumed and not self.ctx.is_main:
            if self.partial is not None:  # rank 0's checkpoint holds the world's totals; count them once
                self.partial = EpochTotals.zeros(self.device, self.partial.lr)
            offset_rng(self.ctx.rank)
        return resumed

    def finish(self) -> dict[str, Any]:
        """Rank 0 evaluates best.pt and writes result.json while the others wait at a barrier."""
        result = super().finish() if self.ctx.is_main else {"fold": self.fold.index}
        dist.barrier(group=self.ctx.control)
        return result

    def _interrupted(self, signum: int, epoch: int, steps: int) -> Interrupted:
        e = super()._interrupted(signum, epoch, steps)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.ctx.world))
        nodes = f"--nnodes={self.ctx.world // per_node} (+ rendezvous options) " if per_node < self.ctx.world else ""
        hint = f"torchrun {nodes}--nproc_per_node={per_node} -m fastcifar train"
        return Interrupted(str(e).replace("resume with: fastcifar train", f"resume with: {hint}"), signum)


class FoldBoard:
    """What fold-parallel ranks share, through the key-value store torchrun's workers meet at (PyTorch's own
    env:// rendezvous: the agent's TCPStore, or one on rank 0): rank 0's go-ahead, then every rank's results."""

    def __init__(self, timeout: timedelta):
        store, self.rank, self.world = next(dist.rendezvous("env://", timeout=timeout))
        self.store = dist.PrefixStore("fastcifar/folds-parallel", store)

    def share(self, key: str, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others wait for it)."""
        if self.rank == 0:
            self.store.set(key, json.dumps(obj))
        return json.loads(self.store.get(key))

    def gather(self, key: str, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (which waits for all of them); None elsewhere."""
        self.store.set(f"{key}/{self.rank}", json.dumps(obj))
        if self.rank:
            return None
        return [json.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)]


def _open_run(is_main: bool, share, stack: contextlib.ExitStack, recipe: Recipe, run_dir: Path, resume: bool,
              device: torch.device, store, extra_env: dict[str, Any]) -> bool:
    """Rank 0 takes the run lock and prepares run_dir; `share` (rank 0's value on every rank) tells the others
    whether the run resumes, or that rank 0 refused and why."""
    from fastcifar.run import start_run

    outcome: list = ["ok", False]
    if is_main:
        try:
            stack.enter_context(RunLock(run_dir))
            outcome = ["ok", start_run(recipe, run_dir, device, store, resume, extra_env)]
        except (FastCifarError, OSError) as e:
            share(["error", str(e), getattr(e, "exit_code", 2)])
            raise
    outcome = share(outcome)
    if outcome[0] == "error":
        raise PeerFailed(outcome[1], outcome[2])
    return bool(outcome[1])


def _train_ddp(ctx: DistContext, recipe: Recipe, run_dir: Path, console, resume: bool, hooks,
               store) -> dict[str, Any] | None:
    from fastcifar.run import _train_folds, configure_runtime, finish_run
    from fastcifar.train import Hooks

    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(GracefulStop())
        extra = {"distributed": {"mode": "ddp", "world_size": ctx.world, "backend": dist.get_backend()}}
        resuming = _open_run(ctx.is_main, lambda obj: broadcast_object(obj, ctx), stack, recipe, run_dir, resume,
                             ctx.device, store, extra)
        configure_runtime(recipe)
        agreed = AgreedStop(stop, ctx, STOP_POLL.get(ctx.device.type, 1))
        results = _train_folds(recipe, store, run_dir, ctx.device, console, resuming, hooks or Hooks(), agreed,
                               make_trainer=partial(DDPFoldTrainer, ctx))
        if not ctx.is_main:
            return None
        summary, report = finish_run(recipe, run_dir, results, console)
    if report is not None:
        console.print(f"report: {report}")
    return summary


def _train_folds_parallel(board: FoldBoard, device: torch.device, recipe: Recipe, run_dir: Path, console,
                          resume: bool, hooks, store) -> dict[str, Any] | None:
    from fastcifar.run import _train_folds, configure_runtime, finish_run
    from fastcifar.train import Hooks

    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(GracefulStop())  # each rank stops on its own: no collective to leave hanging
        extra = {"distributed": {"mode": "folds_parallel", "world_size": board.world}}
        resuming = _open_run(board.rank == 0, lambda obj: board.share("start", obj), stack, recipe, run_dir,
                             resume, device, store, extra)
        configure_runtime(recipe)
        mine = _train_folds(recipe, store, run_dir, device, console, resuming, hooks or Hooks(), stop,
                            select=lambda folds: folds[board.rank::board.world])
        gathered = board.gather("results", mine)
        if gathered is None:
            return None
        results = sorted((r for part in gathered for r in part), key=lambda r: r["fold"])
        summary, report = finish_run(recipe, run_dir, results, console)
    if report is not None:
        console.print(f"report: {report}")
    return summary


def run_distributed(recipe: Recipe, run_dir: Path, console, *, resume: bool = False, folds_parallel: bool = False,
                    hooks=None) -> dict[str, Any] | None:
    """`fastcifar train` in one torchrun worker: DDP, or with folds_parallel this rank's share of the folds.
    Returns the summary on rank 0, None on the other ranks."""
    from rich.console import Console

    from fastcifar.preflight import check_inputs

    env = torchrun_env()
    if env is None:
        raise FastCifarError("--folds-parallel runs one fold per process; launch it with torchrun, e.g. "
                             "torchrun --nproc_per_node=5 -m fastcifar train RECIPE --folds-parallel")
    rank, world, local_rank = env
    device = rank_device(recipe.train.device, local_rank)
    check_recipe(recipe, world, device, folds_parallel)
    if folds_parallel and world > 1:  # live progress bars of W processes on one terminal garble each other
        console = Console(force_terminal=False, soft_wrap=True)
    elif rank:
        console = Console(quiet=True)
    try:
        store = check_inputs(recipe, run_dir if rank == 0 else None, resume, device)
        if folds_parallel:
            board = FoldBoard(FOLDS_PARALLEL_TIMEOUT)
            return _train_folds_parallel(board, device, recipe, run_dir, console, resume, hooks, store)
        with process_group(device, local_rank) as ctx:
            return _train_ddp(ctx, recipe, run_dir, console, resume, hooks, store)
    except FastCifarError as e:
        if rank == 0:
            raise
        if isinstance(e, PeerFailed) or (isinstance(e, Interrupted) and not folds_parallel):
            raise SystemExit(e.exit_code) from None  # rank 0 reports the same refusal or DDP stop
        e.args = (f"rank {rank}: {e}",)  # this rank alone may know it (out of memory on its GPU, ...)
        raise
