"""`fastcifar export CKPT --format onnx|torchscript [--out FILE]`: the checkpoint's model with its evaluation built
in, for use outside fastcifar.

Input: uint8 images, NHWC (batch, S, S, 3), RGB 0..255, S = the trained image size; output: float32 logits (batch,
classes). Inside: the run's normalisation (data.mean / data.std), its resize (augment.resize) and its test-time
augmentation (eval.tta), then the model, so the file gives `fastcifar predict`'s numbers. An image file becomes that
input as prepare --size made the store's images (data.images.fit_image, named by PREPROCESS). The class names, image
size, preprocessing and input contract travel in the file (ONNX metadata "fastcifar", TorchScript extra file
fastcifar.json). The export is checked before it lands: the exported file, loaded back (onnxruntime or
torch.jit.load), against the checkpoint's own model on the same images; the largest difference is printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.atomic import atomic_path
from fastcifar.data import open_store
from fastcifar.data.images import PREPROCESS
from fastcifar.engine import tta_logits
from fastcifar.errors import CheckpointError, FastCifarError, first_line
from fastcifar.evaluate import load_trained_model
from fastcifar.fields import check_fields
from fastcifar.ownership import output_guard

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
META_KEY = "fastcifar"
MIN_OPSET = 18  # torch's ONNX exporter (dynamo) implements its operators from opset 18 on
TOLERANCE = 1e-3  # |logit difference| allowed between the exported file and the checkpoint (fp32 both)
ONNX_MISSING = "--format onnx needs onnx, onnxruntime and onnxscript: pip install 'fastcifar[onnx]'"
# How an image file becomes the input (data.images.fit_image, PREPROCESS): what prepare did to the store's images
FROM_FILES = ("an image file of any size: shorter side to {size} px, centre crop to {size}x{size}, antialiased "
              "bicubic (PIL), as fastcifar prepare --size and fastcifar predict do")


class Deployed(torch.nn.Module):
    """uint8 (B, S, S, 3) -> logits: normalise, resize, TTA and the model, as evaluation runs them."""

    def __init__(self, model: torch.nn.Module, recipe, image_size: int):
        super().__init__()
        self.model, self.tta, self.resize = model, recipe.eval.tta, recipe.augment.resize
        mean = torch.tensor(recipe.data.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(recipe.data.std, dtype=torch.float64).view(1, 3, 1, 1)
        # the constants fastcifar.ops.normalize folds: x * 1 / (255 std) - mean / std
        self.register_buffer("scale", (1.0 / (255.0 * std)).float())
        self.register_buffer("shift", (-mean / std).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=True,
                              align_corners=False)
        return tta_logits(self.model, x.contiguous(), self.tta)


def default_out(checkpoint: Path, fmt: str) -> Path:
    name = checkpoint.name[: -len(checkpoint.suffix)] if checkpoint.suffix else checkpoint.name
    return checkpoint.with_name(name + FORMATS[fmt])


def export(checkpoint: str | Path, fmt: str, out: str | Path | None = None, opset: int = 18,
           log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write the export and return {"out", "input", "classes", "max_abs_diff", "images"}."""
    checkpoint = Path(checkpoint)
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        raise FastCifarError(ONNX_MISSING)
    if fmt == "onnx":
        import onnx  # the [onnx] extra, checked above

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:  # below 18 the exporter falls back to 18 and says so on stderr
            raise FastCifarError(f"--opset: the ONNX exporter writes opsets {MIN_OPSET} to {newest}, got {opset}")
    out = Path(out) if out else default_out(checkpoint, fmt)
    guard = output_guard(out, f"{fmt} export", is_export)
    model, recipe, classes, size = load_trained_model(checkpoint, torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)  # the exported graph runs on any layout
    deployed = Deployed(model, recipe, size).eval()
    meta = {"format": "fastcifar-export", "version": 1, "classes": classes, "image_size": size,
            "input": f"uint8 NHWC (batch, {size}, {size}, 3), RGB 0-255", "output": "float32 logits (batch, classes)",
            "preprocess": PREPROCESS, "image_files": FROM_FILES.format(size=size),
            "recipe": recipe.name, "mean": list(recipe.data.mean), "std": list(recipe.data.std),
            "tta": recipe.eval.tta, "checkpoint": str(checkpoint)}
    images = sample_images(recipe, size)
    with torch.no_grad():
        want = deployed(images).numpy()
    with atomic_path(out, guard, again="export again") as tmp:  # a failed export or parity check leaves nothing behind
        (_onnx if fmt == "onnx" else _torchscript)(deployed, images, tmp, meta, opset)
        got = run_exported(tmp, images.numpy())
        diff = float(np.abs(got - want).max())
        if not diff <= TOLERANCE:
            raise CheckpointError(f"{out}: parity check failed: the exported {fmt} differs from the checkpoint by "
                                  f"{diff:.3g} (tolerance {TOLERANCE})")
    log(f"wrote {out}: input {meta['input']}, output {meta['output']}; parity on {len(images)} images: "
        f"max |logit difference| {diff:.2e} against {checkpoint}")
    return {"out": str(out), "input": meta["input"], "classes": classes, "max_abs_diff": diff, "images": len(images)}


def sample_images(recipe, size: int, n: int = 8) -> torch.Tensor:
    """n test images of the run's store when it is there at the trained size, else seeded random pixels."""
    try:  # the store may be gone: an export can be made from a checkpoint alone
        store = open_store(Path(recipe.data.store))
        if store.test_images.shape[1:3] == (size, size):
            rows = np.linspace(0, len(store.test_images) - 1, n).round().astype(np.int64)
            return torch.from_numpy(np.array(store.test_images[rows]))
    except FastCifarError:
        pass
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _onnx(deployed: Deployed, images: torch.Tensor, path: Path, meta: dict, opset: int) -> None:
    import onnx  # the [onnx] extra: imported only for this format

    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.onnx.export(deployed, (images,), dynamo=True, opset_version=opset, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        model = program.model_proto  # in memory: the file is written once, below, by a write that can fail cleanly
    except Exception as e:  # noqa: BLE001 - the exporter raises many types for an unsupported op or opset
        raise CheckpointError(f"{meta['checkpoint']}: cannot export to ONNX opset {opset} ({first_line(e)[:200]})") \
            from None
    made = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if made != opset:  # the exporter falls back to its own opset when converting to the asked one fails
        raise CheckpointError(f"{meta['checkpoint']}: cannot export to ONNX opset {opset} (the exporter could only "
                              f"produce opset {made}); pass --opset {made}")
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    path.write_bytes(model.SerializeToString())  # ENOSPC here is atomic_path's disk-full line


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.10+ marks TorchScript deprecated (the format still loads in C++ and older torch): the user asked
    for it, so its FutureWarnings would only repeat what the README says."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def _torchscript(deployed: Deployed, images: torch.Tensor, path: Path, meta: dict, opset: int) -> None:
    buffer = io.BytesIO()
    try:
        with _quiet_jit(), torch.no_grad():
            traced = torch.jit.trace(deployed, (images,), check_trace=False)
            torch.jit.save(traced, buffer, _extra_files={f"{META_KEY}.json": json.dumps(meta)})
    except Exception as e:  # noqa: BLE001 - tracing fails in many ways for models it cannot follow
        raise CheckpointError(f"{meta['checkpoint']}: cannot export to TorchScript ({first_line(e)[:200]})") from None
    # Written by Python, not by torch.jit.save's zip writer: on a full disk that aborts the process with a C++
    # stack (exit 134, its temp file left); a plain write raises ENOSPC, which atomic_path turns into one line.
    path.write_bytes(buffer.getbuffer())


# ---------------------------------------------------------------------------------------------- loading


def export_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a fastcifar export (ONNX or TorchScript), or None when `path` is not one."""
    try:
        if path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            meta = json.loads(props[META_KEY])
        else:
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith(f"extra/{META_KEY}.json"))
                meta = json.loads(zf.read(name))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an export
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "fastcifar-export" else None


def is_export(path: Path) -> bool:
    return export_meta(path) is not None


def exported_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An exported file loaded once (an onnxruntime session or a TorchScript module): uint8 NHWC images -> logits."""
    if path.suffix == ".onnx" or _is_onnx(path):
        if importlib.util.find_spec("onnxruntime") is None:
            raise FastCifarError(f"{path}: running an ONNX export needs onnxruntime: pip install 'fastcifar[onnx]'")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": np.ascontiguousarray(images)})[0]
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: np.ndarray) -> np.ndarray:
        with _quiet_jit(), torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    return run


def run_exported(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 NHWC images through an exported file."""
    return exported_runner(path)(images)


def _is_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        return not f.read(2).startswith(b"PK")  # TorchScript files are zip archives; ONNX is a protobuf


def read_export(path: Path) -> dict[str, Any]:
    """The metadata of an export given to `predict`, or a one-line refusal."""
    meta = export_meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a fastcifar export (no {META_KEY} metadata)")
    for key in ("classes", "image_size"):
        if key not in meta:
            raise CheckpointError(f"{path}: {key}: missing from its {META_KEY} metadata")
    check_fields(meta, path, only=("classes", "image_size", "preprocess"))  # as a checkpoint's are
    return meta


def looks_exported(path: Path) -> bool:
    """An ONNX file, or a zip holding fastcifar's TorchScript extra file (a checkpoint holds none)."""
    if path.suffix == ".onnx":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(f"extra/{META_KEY}.json") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False

