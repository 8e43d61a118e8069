"""The current CIFAR-10 speed records, run unchanged beside us (bench/peer_records.py): airbench94_muon.py
(KellerJordan/cifar10-airbench @ f1c599c) and Hiverge's cifar10_speedrun.py (hiverge/cifar10-speedrun @ 5cd49b1).

Their files are never copied into this project (licence and project rule): they are loaded from the folder that
holds them (../shared/peers beside the checkout, carry/peers on a device box, or a path given) and executed as
they are. Both scripts train under `if __name__ == "__main__":` (200 runs); loaded under another module name,
only their definitions run, and the harness drives their own `main(run, model)` the way their __main__ does:
`model = CifarNet().cuda().to(memory_format=torch.channels_last)`, `model.compile(mode="max-autotune")` (GPU),
one warm-up `main("warmup", model)` (GPU), then `main(i, model)` per timed run.

What the harness puts around them, never in them:
- data: their CifarLoader("cifar10", ...) is handed our store's train.pt / test.pt (fastcifar.bench.airbench
  writes the torchvision-style files both read) through a module-level stand-in for the name CifarLoader; a tiny
  CPU smoke run may also shrink their training batch (recorded).
- results: their print_training_details(locals(), ...) is replaced by a recorder of the final entry's variables
  (tta_val_acc, val_acc, time_seconds), and `evaluate` by a wrapper that times the final TTA evaluation; their
  optimizer steps are counted with torch's global optimizer-step hook.
- on a CPU (peer_on_cpu): every float16 they ask for becomes fp32 (default) or bf16, every CUDA device the CPU,
  .cuda() / .pin_memory() no-ops (one TorchFunctionMode, CpuRedirect); torch.compile the identity (inductor's
  C++ builds would take minutes, and our CPU side runs eager too); torch.cuda.Event / synchronize perf_counter
  stand-ins; torch.load(map_location="cuda") loads to the CPU. All restored on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from fastcifar.bench.airbench import _CpuEvent
from fastcifar.bench.timing import Clock
from fastcifar.errors import FastCifarError


@dataclass(frozen=True)
class PeerSpec:
    """A peer script and the facts of its main() the harness needs to match it step for step (tests check that
    the file still says them: tests/test_peer_records.py::test_peer_facts_are_what_the_files_say)."""

    name: str
    path: str  # inside the peers folder
    source: str
    batch_size: int  # its training batch
    epochs: float  # total_train_steps = ceil(epochs * (N // batch_size))
    tta: str  # our eval.tta / eval.tta_fraction equivalent of its final evaluation
    tta_fraction: float


PEERS: dict[str, PeerSpec] = {
    "airbench94_muon": PeerSpec("airbench94_muon", "airbench94_muon/airbench94_muon.py",
                                "KellerJordan/cifar10-airbench @ f1c599c", 2000, 8.0, "flip_translate", 1.0),
    "hiverge": PeerSpec("hiverge", "hiverge_speedrun/cifar10_speedrun.py", "hiverge/cifar10-speedrun @ 5cd49b1",
                        1536, 7.59, "flip_translate_mean", 0.25),
}


class PeerError(FastCifarError):
    exit_code = 2


def peer_steps(spec: PeerSpec, n_train: int, batch_size: int | None = None) -> int:
    """The optimizer steps its main() takes on n_train images: ceil(epochs * len(train_loader))."""
    return math.ceil(spec.epochs * (n_train // (batch_size or spec.batch_size)))


def find_peers(given: str | None, candidates: list[Path]) -> Path | None:
    """The peers folder: `given` (must exist), else $FASTCIFAR_PEERS, else the first candidate that exists."""
    if given:
        if not Path(given).is_dir():
            raise PeerError(f"--peers: {given}: no such folder")
        return Path(given)
    env = os.environ.get("FASTCIFAR_PEERS")
    for folder in ([Path(env)] if env else []) + candidates:
        if folder.is_dir():
            return folder
    return None


# ---------------------------------------------------------------------------------------------- the CPU shim


class CpuRedirect(TorchFunctionMode):
    """While active, torch calls made for CUDA in fp16 run on the CPU: a `device` argument naming CUDA becomes
    the CPU, a float16 `dtype` argument and Tensor.half() become `dtype`, Tensor.cuda() / pin_memory() return
    the tensor. Module.half() goes through Tensor.half(), so a model built in fp16 is built in `dtype`."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.half:
            return args[0].to(self.dtype)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if kwargs.get("dtype") is torch.float16:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)


def _uncompiled(fn=None, *args, **kwargs):
    """torch.compile's signature, doing nothing: `@torch.compile`, `@torch.compile(fullgraph=True)`, and
    torch.compile(fn, mode=...) all return the function itself."""
    return fn if callable(fn) else (lambda f: f)


@contextlib.contextmanager
def peer_on_cpu(dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """A CUDA fp16 script run on the CPU, untouched (see the module docstring); everything restored on exit."""
    real_load = torch.load

    def load_to_cpu(*args, **kwargs):
        kwargs["map_location"] = "cpu"
        return real_load(*args, **kwargs)

    saved = (torch.compile, torch.cuda.Event, torch.cuda.synchronize, torch.load, torch.nn.Module.cuda)
    torch.compile, torch.cuda.Event, torch.cuda.synchronize = _uncompiled, _CpuEvent, lambda *a, **k: None
    torch.load, torch.nn.Module.cuda = load_to_cpu, lambda self, *a, **k: self
    try:
        with CpuRedirect(dtype):
            yield
    finally:
        torch.compile, torch.cuda.Event, torch.cuda.synchronize, torch.load, torch.nn.Module.cuda = saved


def load_peer(path: Path, cpu: bool, dtype: torch.dtype = torch.float32) -> ModuleType:
    """The peer script as a module, its definitions run, its __main__ block not (it is loaded under another
    name). It reads sys.argv[0] as its own source at import (to log it) and sets cudnn.benchmark = True: argv[0]
    points at the file while it loads, and cudnn.benchmark is restored after."""
    if not path.is_file():
        raise PeerError(f"{path}: peer script not found (give --peers FOLDER, or stage it: bench/stage_device.sh)")
    spec = importlib.util.spec_from_file_location(f"fastcifar_peer_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    argv0, bench = sys.argv[0] if sys.argv else "", torch.backends.cudnn.benchmark
    if not sys.argv:
        sys.argv.append("")
    sys.argv[0] = str(path)
    try:
        with peer_on_cpu(dtype) if cpu else contextlib.nullcontext(), warnings.catch_warnings():
            # airbench94_muon's docstring has a "\s" (a DeprecationWarning when compiled): theirs, not ours to fix
            for category in (DeprecationWarning, SyntaxWarning):
                warnings.filterwarnings("ignore", "invalid escape sequence", category)
            spec.loader.exec_module(module)
    finally:
        sys.argv[0] = argv0
        if not cpu:  # on a GPU their cudnn.benchmark = True stays, as in their own runs
            bench = True
        torch.backends.cudnn.benchmark = bench
    return module


# ---------------------------------------------------------------------------------------------- one run


@contextlib.contextmanager
def _patched(module: ModuleType, **names: Any) -> Iterator[None]:
    saved = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


@contextlib.contextmanager
def _count_steps(cls: type) -> Iterator[list[int]]:
    """Optimizer steps of instances of `cls` while active (torch's global post-step hook)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: count.__setitem__(0, count[0] + 1) if isinstance(opt, cls) else None)
    try:
        yield count
    finally:
        handle.remove()


class PeerRunner:
    """One peer, loaded once, its model built once (as their __main__ keeps one compiled model for all runs)."""

    def __init__(self, spec: PeerSpec, folder: Path, data_dir: Path, device: torch.device,
                 cpu_dtype: torch.dtype = torch.float32, train_batch: int | None = None):
        self.spec, self.data_dir, self.device, self.cpu_dtype = spec, data_dir, device, cpu_dtype
        self.train_batch = train_batch  # None: their own; set only by a tiny smoke run
        self.cpu = device.type != "cuda"
        self.module = load_peer(folder / spec.path, self.cpu, cpu_dtype)
        self.n_train = len(torch.load(data_dir / "train.pt", weights_only=True)["labels"])
        self.model = None

    def _shim(self):
        return peer_on_cpu(self.cpu_dtype) if self.cpu else contextlib.nullcontext()

    def _loader(self) -> Callable:
        original, data, batch = self.module.CifarLoader, str(self.data_dir), self.train_batch

        def cifar_loader(path, train=True, batch_size=500, aug=None):  # their CifarLoader("cifar10", ...)
            return original(data, train, batch_size=(batch or batch_size) if train else batch_size, aug=aug)

        return cifar_loader

    def _build(self) -> None:
        m = self.module
        with self._shim():
            self.model = m.CifarNet().cuda().to(memory_format=torch.channels_last)
        if not self.cpu:
            self.model.compile(mode="max-autotune")

    def warm_up(self) -> None:
        """Their own warm-up run (random labels; compile and autotuning), GPU only."""
        if self.model is None:
            self._build()
        if not self.cpu:
            with _patched(self.module, CifarLoader=self._loader(), print_training_details=lambda *a, **k: None):
                self.module.main("warmup", self.model)

    def run(self, seed: int) -> dict[str, Any]:
        if self.model is None:
            self._build()
        m, clock, final, tta = self.module, Clock(self.device), {}, []
        original_evaluate = m.evaluate

        def evaluate(model, loader, tta_level=0):
            t0 = clock.mark()
            acc = original_evaluate(model, loader, tta_level)
            if tta_level == 2:
                tta.append((t0, clock.mark()))
            return acc

        def record(variables, is_final_entry):
            if is_final_entry:
                final.update({k: variables.get(k) for k in ("tta_val_acc", "val_acc", "time_seconds")})

        torch.manual_seed(seed)  # both draw from torch's global generator (shuffles, flips, crops, jitter)
        with _patched(m, CifarLoader=self._loader(), print_training_details=record, evaluate=evaluate), \
                _count_steps(m.Muon) as steps, self._shim():
            m.main(seed, self.model)
        n_train, eval_s = self.n_train, clock.seconds(*tta[-1])
        want = peer_steps(self.spec, n_train, self.train_batch)
        if steps[0] != want:  # the file no longer does what PEERS says: a comparison at "equal steps" would lie
            raise PeerError(f"{self.spec.name}: took {steps[0]} optimizer steps, expected {want} "
                            f"(ceil({self.spec.epochs} * ({n_train} // {self.train_batch or self.spec.batch_size})))")
        return {"acc": float(final["tta_val_acc"]), "acc_no_tta": float(final["val_acc"]),
                "time_s": float(final["time_seconds"]), "eval_s": eval_s,
                "train_s": float(final["time_seconds"]) - eval_s, "steps": steps[0],
                "images": steps[0] * (self.train_batch or self.spec.batch_size)}

    def facts(self) -> dict[str, Any]:
        batch, n_train = self.train_batch or self.spec.batch_size, self.n_train
        mode = ("their own code on CUDA (fp16, torch.compile as in their __main__)" if not self.cpu else
                f"their own code on the CPU in {str(self.cpu_dtype).removeprefix('torch.')} for their fp16, eager "
                "(fastcifar.bench.peers.peer_on_cpu)")
        return {"source": self.spec.source, "file": self.spec.path, "batch_size": batch,
                "batch_overridden": self.train_batch is not None, "epochs": self.spec.epochs,
                "train_images": n_train, "steps": peer_steps(self.spec, n_train, self.train_batch), "mode": mode,
                "timing": "their own timer region (time_seconds); eval_s: their final TTA evaluate()"}
