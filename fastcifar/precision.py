"""train.amp = "auto": on a CPU, the faster of fp32 and bf16 autocast for this model on this machine, measured.

Which is faster depends on both: on a 2-core EPYC with AVX512-BF16, speedrun_net trains ~1.8x faster under bf16
autocast (channels-last), while cnn_bn is slower in bf16 than in fp32. So "auto" measures instead of guessing:
a few forward + backward steps of a copy of the model at the run's batch (at most PROBE_BATCH), alternating fp32 and
bf16 so that other load on the machine hits both alike, and takes bf16 when it is at least MARGIN faster (fp32,
the exact one, when they are close). The answer is cached per (model, batch, layout, CPU, threads, torch) in
$FASTCIFAR_CACHE/precision.json (default ~/.cache/fastcifar/), so a machine measures each model once; the run
records what was chosen, how, and the rates (result.json: engine.precision). GPUs and MPS use autocast as
train.amp = true does; train.amp_cpu = true forces bf16 on the CPU without measuring.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastcifar.atomic import write_json
from fastcifar.device import cpu_model

PROBE_BATCH = 128  # throughput per image is flat beyond this on a CPU; the probe stays a few seconds
PROBE_STEPS = 3  # timed steps per precision (after one warm-up step each)
MARGIN = 1.05  # bf16 must be this much faster to be chosen
CACHE_VERSION = 1


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16"
    chosen_by: str  # "probe", "cache" or "train.amp_cpu"
    img_per_s: dict[str, float]  # the probe's training img/s of each ({} when forced)
    probe_batch: int
    key: str

    @property
    def dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, model: str) -> str:
        if not self.img_per_s:
            return f"train.amp = auto: {model} on the CPU in {self.precision} ({self.chosen_by})"
        rates = ", ".join(f"{k} {v:,.0f} img/s" for k, v in self.img_per_s.items())
        return (f"train.amp = auto: {model} on this CPU in {self.precision} ({rates} at batch {self.probe_batch}; "
                f"{'measured now' if self.chosen_by == 'probe' else 'measured before, cached'})")


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def model_desc(model_cfg, name: str | None = None) -> dict[str, Any]:
    """What decides a model's speed, for the cache key: its name, width and own options (a recipe's model
    section; `name`: another model benched beside it, at its defaults)."""
    from fastcifar.models import model_options

    if name is not None and name != model_cfg.name:
        return {"name": name, "width": 0}
    return {"name": model_cfg.name, "width": model_cfg.width, **model_options(model_cfg)}


def cache_path() -> Path:
    base = os.environ.get("FASTCIFAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "fastcifar")
    return Path(base) / "precision.json"


def probe_key(model_desc: dict[str, Any], batch: int, channels_last: bool, image_size: int) -> str:
    return json.dumps({"model": model_desc, "batch": batch, "channels_last": channels_last, "image": image_size,
                       "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__},
                      sort_keys=True)


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _cached(entry: Any) -> dict[str, float] | None:
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                       for k in ("fp32", "bf16")):
        return {"fp32": float(entry["fp32"]), "bf16": float(entry["bf16"])}
    return None


def measure(model: torch.nn.Module, batch: int, image_size: int, num_classes: int, channels_last: bool,
            steps: int = PROBE_STEPS) -> dict[str, float]:
    """Training img/s (forward + backward) of a copy of `model` in fp32 and in bf16 autocast on the CPU: the
    median of `steps` timed steps each, after one warm-up step each, the two alternating. The model, its
    statistics and every random generator are left as they were."""
    with torch.random.fork_rng(devices=[]):
        net = copy.deepcopy(model).train()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, image_size, image_size, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        y = torch.randint(0, num_classes, (batch,), generator=gen)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for i in range(steps + 1):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    logits = net(x)
                F.cross_entropy(logits.float(), y).backward()
                net.zero_grad(set_to_none=True)
                if i:  # the first round warms up (oneDNN primitive creation, allocator)
                    times[name].append(time.perf_counter() - t0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def choose_cpu_precision(model: torch.nn.Module, model_desc: dict[str, Any], batch: int, image_size: int,
                         num_classes: int, channels_last: bool, forced_bf16: bool = False,
                         log: Callable[[str], Any] | None = None) -> PrecisionChoice:
    """The CPU precision for train.amp = "auto" (see the module docstring)."""
    probe_batch = min(batch, PROBE_BATCH)
    key = probe_key(model_desc, probe_batch, channels_last, image_size)
    if forced_bf16:
        return PrecisionChoice("bf16", "train.amp_cpu", {}, probe_batch, key)
    path = cache_path()
    entries = _read_cache(path)
    rates = _cached(entries.get(key))
    how = "cache"
    if rates is None:
        rates = measure(model, probe_batch, image_size, num_classes, channels_last)
        how = "probe"
        entries = {**_read_cache(path), key: {**rates, "date": time.strftime("%Y-%m-%d")}}  # others' entries too
        try:
            write_json(path, {"version": CACHE_VERSION, "entries": entries})
        except OSError as e:  # a read-only home: the choice stands, it is only measured again next time
            if log is not None:
                log(f"train.amp = auto: could not cache the measurement in {path} ({e.strerror})")
    precision = "bf16" if rates["bf16"] >= MARGIN * rates["fp32"] else "fp32"
    choice = PrecisionChoice(precision, how, rates, probe_batch, key)
    if log is not None:
        log(choice.line(str(model_desc.get("name", "model"))))
    return choice
