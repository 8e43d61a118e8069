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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
from rich.console import Console

from fastcifar.context import Hooks
from fastcifar.console import make_console
from fastcifar.device import resolve_device
from fastcifar.engine import Engine, compile_model
from fastcifar.errors import FastCifarError, RecipeError
from fastcifar.lifecycle import GracefulStop, Interrupted, StopFlag
from fastcifar.loader import DeviceLoader, TrainLoader
from fastcifar.preflight import check_distributed, check_inputs
from fastcifar.recipe import Recipe
from fastcifar.run import drive
from fastcifar.step import EpochTotals
from fastcifar.strategy import Solo

if TYPE_CHECKING:
    from fastcifar.splits import Fold

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
    # log_mark counts rank 0's own images (its TensorBoard step points): no point of the world's sums
    return dataclasses.replace(totals, loss_sum=packed[0].clone(), correct=packed[1].round().long(), log_mark=None,
                               **summed)


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


def torchrun_command(world: int) -> str:
    """How to start this run's processes again (the resume hint): torchrun with this run's shape."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // per_node} (+ rendezvous options) " if per_node < world else ""
    return f"torchrun {nodes}--nproc_per_node={per_node} -m fastcifar train"


class DDP(Solo):
    """Every rank trains every fold on its slice of the global batch; rank 0's numbers decide and rank 0 writes."""

    def __init__(self, ctx: DistContext, sync_bn: bool = False):
        self.ctx, self.sync_bn = ctx, sync_bn
        self.writes_run = self.writes_fold = ctx.is_main
        self.env = {"distributed": {"mode": "ddp", "world_size": ctx.world, "backend": dist.get_backend()}}
        self.resume_command = torchrun_command(ctx.world)

    def open_run(self, start: Callable[[], bool]) -> bool:
        return share_start(self.ctx.is_main, lambda obj: broadcast_object(obj, self.ctx), start)

    def stop(self, stop: GracefulStop) -> StopFlag:
        return AgreedStop(stop, self.ctx, STOP_POLL.get(self.ctx.device.type, 1))

    def adopt_loader(self, loader: TrainLoader) -> None:
        assert isinstance(loader, DeviceLoader)  # preflight.check_distributed: DDP shards the "device" loader only
        loader.shard = (self.ctx.rank, self.ctx.world)  # batch_size divisible by W: preflight too

    def adopt_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.sync_bn:  # preflight: CUDA only, and a model whose entry allows it (models.ModelEntry)
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameters
        return model

    def train_net(self, model: torch.nn.Module, engine: Engine) -> torch.nn.Module:
        # DDP hooks the parameters that require grad when it is built; a fine-tuning stage change flips
        # requires_grad, so each stage gets its own wrapper (which also re-broadcasts rank 0's weights).
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False,
                                                        gradient_as_bucket_view=True)
        if engine.plan.compile:  # compile(DDP(model)), the order torch's DDPOptimizer splits at gradient buckets
            net = compile_model(net, engine.plan.compile_mode)
        return net

    def seeded(self) -> None:
        offset_rng(self.ctx.rank)

    def reduce(self, totals: EpochTotals) -> EpochTotals:
        return reduce_totals(totals, self.ctx)

    def agree(self, row: dict[str, float]) -> dict[str, float]:
        return broadcast_object(row, self.ctx)

    def resumed(self, partial: EpochTotals | None) -> EpochTotals | None:
        if self.ctx.is_main:
            return partial
        offset_rng(self.ctx.rank)
        # rank 0's checkpoint holds the world's totals; count them once
        return EpochTotals.zeros(partial.loss_sum.device, partial.lr) if partial is not None else None

    def finish_fold(self, finish: Callable[[], dict[str, Any]], fold_index: int) -> dict[str, Any]:
        """Rank 0 evaluates best.pt and writes result.json while the others wait at a barrier."""
        result = finish() if self.ctx.is_main else {"fold": fold_index}
        dist.barrier(group=self.ctx.control)
        return result

    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        return results if self.ctx.is_main else None


class FoldsParallel(Solo):
    """Rank r trains folds r, r+W, ... as ordinary single-process runs; rank 0 gathers and writes the summary."""

    def __init__(self, board: "FoldBoard"):
        self.board = board
        self.writes_run = board.rank == 0
        self.env = {"distributed": {"mode": "folds_parallel", "world_size": board.world}}
        self.resume_command = torchrun_command(board.world) + " --folds-parallel"

    def open_run(self, start: Callable[[], bool]) -> bool:
        return share_start(self.board.rank == 0, lambda obj: self.board.share("start", obj), start)

    def folds(self, folds: list[Fold]) -> list[Fold]:
        return folds[self.board.rank::self.board.world]

    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        gathered = self.board.gather("results", results)
        if gathered is None:
            return None
        return sorted((r for part in gathered for r in part), key=lambda r: r["fold"])


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


def share_start(is_main: bool, share: Callable[[Any], Any], start: Callable[[], bool]) -> bool:
    """Rank 0 takes the run lock and prepares run_dir (`start`); `share` (rank 0's value on every rank) tells
    the others whether the run resumes, or that rank 0 refused and why."""
    outcome: list = ["ok", False]
    if is_main:
        try:
            outcome = ["ok", start()]
        except (FastCifarError, OSError) as e:
            share(["error", str(e), getattr(e, "exit_code", 2)])
            raise
    outcome = share(outcome)
    if outcome[0] == "error":
        raise PeerFailed(outcome[1], outcome[2])
    return bool(outcome[1])


def run_distributed(recipe: Recipe, run_dir: Path, console: Console, *, resume: bool = False,
                    folds_parallel: bool = False, hooks: Hooks | None = None) -> dict[str, Any] | None:
    """`fastcifar train` in one torchrun worker: DDP, or with folds_parallel this rank's share of the folds.
    Returns the summary on rank 0, None on the other ranks."""
    env = torchrun_env()
    if env is None:
        raise FastCifarError("--folds-parallel runs one fold per process; launch it with torchrun, e.g. "
                             "torchrun --nproc_per_node=5 -m fastcifar train RECIPE --folds-parallel")
    rank, world, local_rank = env
    device = rank_device(recipe.train.device, local_rank)
    check_distributed(recipe, world, device, folds_parallel)
    if folds_parallel and world > 1:  # live progress bars of W processes on one terminal garble each other
        console = make_console(force_terminal=False)
    elif rank:
        console = Console(quiet=True)
    try:
        plan = check_inputs(recipe, run_dir, resume, device, check_dir=rank == 0)
        if folds_parallel:
            return drive(plan, console, FoldsParallel(FoldBoard(FOLDS_PARALLEL_TIMEOUT)), hooks)
        with process_group(device, local_rank) as ctx:
            return drive(plan, console, DDP(ctx, plan.recipe.train.sync_bn), hooks)
    except FastCifarError as e:
        if rank == 0:
            raise
        if isinstance(e, PeerFailed) or (isinstance(e, Interrupted) and not folds_parallel):
            raise SystemExit(e.exit_code) from None  # rank 0 reports the same refusal or DDP stop
        e.args = (f"rank {rank}: {e}",)  # this rank alone may know it (out of memory on its GPU, ...)
        raise
