"""The fused crop/flip/normalise/erase op: its torch reference against the unfused basic ops and an independent
pad-then-slice construction, and the Triton kernel against the reference.

The kernel runs on CPU through Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before triton
is first imported; so the interpreter runs in one child process (this module, re-imported there, runs
`_interpreter_worker`), and this process only compares the tensors it saved. The full-size CUDA test is the one
test skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastcifar.augment import basic as B
from fastcifar.errors import RecipeError
from fastcifar.kernels.crop_flip import (crop_flip_erase_reference, crop_flip_erase_triton,
                                         fused_crop_flip_erase)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(b: int, h: int, w: int, padding: int, k: int, seed: int, n: int = 20, device="cpu") -> dict:
    """A store of n random images and one batch's parameters: rows with a repeat, offsets over [0, 2p], flips
    alternating, boxes of every size including empty (0 x w) and overlapping ones."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
    idx = torch.randint(0, n, (b,), generator=g)
    idx[-1] = idx[0]
    top, left = torch.randint(0, h, (b, k), generator=g), torch.randint(0, w, (b, k), generator=g)
    eh = torch.minimum(torch.randint(0, h // 2 + 2, (b, k), generator=g), h - top)
    ew = torch.minimum(torch.randint(1, w // 2 + 2, (b, k), generator=g), w - left)
    args = dict(source=source, idx=idx, oy=torch.randint(0, 2 * padding + 1, (b,), generator=g),
                ox=torch.randint(0, 2 * padding + 1, (b,), generator=g), flip=torch.arange(b) % 2 == 0,
                boxes=torch.stack([top, left, eh, ew], dim=-1),
                fill_value=torch.randn(k, 3, generator=g))
    return {key: v.to(device) for key, v in args.items()}


# name -> (mode, padding, dtype, h, w, fill kinds); 8x12 catches an H/W swap, 5x7 a ragged last block
CASES = {f"{mode}-p{p}-{d}": (mode, p, d, 32, 32, ("constant", "zero", "constant"))
         for mode in ("reflect", "constant") for p in (0, 4) for d in DTYPES}
CASES.update({"rect-reflect-bf16": ("reflect", 3, "bf16", 8, 12, ("zero", "constant")),
              "ragged-constant-fp32": ("constant", 2, "fp32", 5, 7, ("constant",)),
              "no-boxes-fp16": ("reflect", 4, "fp16", 32, 32, ())})
RANDOM_SEEDS = (7, 8)


def _run_case(fn, name: str, **extra) -> torch.Tensor:
    mode, p, d, h, w, kinds = CASES[name]
    a = _inputs(4, h, w, p, len(kinds), seed=len(CASES) + sorted(CASES).index(name))
    return fn(a["source"], a["idx"], a["oy"], a["ox"], a["flip"], a["boxes"], kinds, a["fill_value"], MEAN, STD,
              padding=p, mode=mode, out_dtype=DTYPES[d], **extra)


def _random_args(device="cpu", b: int = 4) -> dict:
    """Two random boxes: a large one (24x24 -> 1728 values per sample) and a smaller one on top of it,
    then a constant box over part of both, so order and masks are both visible."""
    a = _inputs(b, 32, 32, 4, 3, seed=99, device=device)
    a["boxes"][:] = torch.tensor([[4, 2, 24, 24], [10, 12, 10, 16], [0, 0, 6, 8]], device=device)
    a["boxes"][1, 1] = torch.tensor([0, 0, 0, 32])  # sample 1: empty second box
    return a


RANDOM_KINDS = ("random", "random", "constant")


def _random_call(fn, a: dict, dtype=torch.bfloat16, **extra) -> torch.Tensor:
    return fn(a["source"], a["idx"], a["oy"], a["ox"], a["flip"], a["boxes"], RANDOM_KINDS, a["fill_value"],
              MEAN, STD, padding=4, mode="reflect", out_dtype=dtype, **extra)


def _interpreter_worker(out_path: str) -> None:
    """Runs in the child with TRITON_INTERPRET=1: kernel and reference outputs for every case, saved for the
    parent to compare."""
    results = {name: (_run_case(crop_flip_erase_triton, name), _run_case(crop_flip_erase_reference, name))
               for name in CASES}
    a = _random_args()
    results["random"] = tuple(_random_call(crop_flip_erase_triton, a, seed=s) for s in RANDOM_SEEDS + (7,))
    results["random-ref"] = (_random_call(crop_flip_erase_reference, a, gen=torch.Generator().manual_seed(0)),)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("interp") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_kernels; "
            f"test_kernels._interpreter_worker({str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_kernel_equals_reference(interp, name):
    kernel, ref = interp[name]
    _, _, d, h, w, _ = CASES[name]
    assert kernel.dtype == DTYPES[d] and kernel.shape == (4, 3, h, w)
    assert kernel.is_contiguous(memory_format=torch.channels_last)
    # bit-exact in every dtype: both paths take the normalised values from the same torch op (see crop_flip)
    torch.testing.assert_close(kernel, ref, rtol=0, atol=0)


def _box_mask(a: dict, ks) -> torch.Tensor:
    """(B, 1, H, W) union of the boxes ks, by explicit loops (independent of ops.box_mask)."""
    mask = torch.zeros(a["boxes"].shape[0], 1, 32, 32, dtype=torch.bool)
    for i, boxes in enumerate(a["boxes"].tolist()):
        for k in ks:
            t, l, h, w = boxes[k]
            mask[i, :, t:t + h, l:l + w] = True
    return mask


def test_interpreted_random_fill(interp):
    a = _random_args()
    (first, other, again), (ref,) = interp["random"], interp["random-ref"]
    random_mask = _box_mask(a, [0, 1]) & ~_box_mask(a, [2])
    assert torch.equal(first[~random_mask.expand_as(first)], ref[~random_mask.expand_as(ref)])  # same mask
    noise = first[random_mask.expand_as(first)].float()
    assert noise.numel() > 5000
    # ~N(0, 1): with ~6.9k values the sample mean has sd 0.012 and the sd an sd of ~0.009; bounds are ~6 sd
    assert abs(noise.mean().item()) < 0.08 and abs(noise.std().item() - 1) < 0.06
    assert torch.equal(first, again)  # a function of the seed
    assert (first != other)[random_mask.expand_as(first)].float().mean() > 0.99
    box0 = first[:, :, 4:10, 8:26]  # inside the large box in every sample, outside the others
    assert (box0[0] != box0[1]).float().mean() > 0.99  # each sample has its own noise


@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("padding", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_unfused_chain_with_random_erasing(mode, padding, dtype):
    """Same generator state, same draw order: basic's crop -> hflip -> normalize -> random_erasing("random")
    against parameters drawn once and handed to the reference."""
    b, p_erase, scale, ratio = 24, 0.7, (0.02, 0.33), (0.3, 3.3)
    a = _inputs(b, 16, 16, padding, 1, seed=1)
    x = a["source"][a["idx"]].permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(5)
    x = B.hflip(B.random_crop(x, padding, g, mode), 0.5, g)
    expected = B.random_erasing(B.normalize(x, MEAN, STD, dtype), p_erase, scale, ratio, "random", g)

    g = torch.Generator().manual_seed(5)
    oy = ox = torch.zeros(b, dtype=torch.long)
    if padding:
        span = torch.full((b,), 2 * padding + 1)
        oy, ox = B._randint(span, g), B._randint(span, g)
    flip = torch.rand(b, generator=g) < 0.5
    apply = torch.rand(b, generator=g) < p_erase
    top, left, eh, ew, found = B.erasing_boxes(b, 16, 16, scale, ratio, g, "cpu")
    boxes = torch.stack([top, left, eh * (apply & found), ew], dim=-1)[:, None]
    got = crop_flip_erase_reference(a["source"], a["idx"], oy, ox, flip, boxes, ("random",),
                                    torch.zeros(1, 3), MEAN, STD, padding=padding, mode=mode, out_dtype=dtype,
                                    gen=g)
    assert 0 < int((apply & found).sum()) < b  # both erased and untouched samples are covered
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reference_equals_unfused_chain_with_constant_erasing_then_cutout():
    b, value = 24, (0.5, -1.25, 2.0)
    a = _inputs(b, 16, 16, 4, 1, seed=2)
    g = torch.Generator().manual_seed(6)
    x = B.hflip(B.random_crop(a["source"][a["idx"]].permute(0, 3, 1, 2), 4, g, "reflect"), 0.5, g)
    x = B.random_erasing(B.normalize(x, MEAN, STD, torch.float16), 1.0, (0.1, 0.3), (0.5, 2.0), value, g)
    expected = B.cutout(x, 6, g)

    g = torch.Generator().manual_seed(6)
    span = torch.full((b,), 9)
    oy, ox = B._randint(span, g), B._randint(span, g)
    flip = torch.rand(b, generator=g) < 0.5
    apply = torch.rand(b, generator=g) < 1.0
    top, left, eh, ew, found = B.erasing_boxes(b, 16, 16, (0.1, 0.3), (0.5, 2.0), g, "cpu")
    erase = torch.stack([top, left, eh * (apply & found), ew], dim=-1)
    cut = torch.stack(B.cutout_boxes(b, 16, 16, 6, g, "cpu"), dim=-1)
    fill = torch.tensor([value, (0.0, 0.0, 0.0)])
    got = crop_flip_erase_reference(a["source"], a["idx"], oy, ox, flip, torch.stack([erase, cut], dim=1),
                                    ("constant", "zero"), fill, MEAN, STD, padding=4, mode="reflect",
                                    out_dtype=torch.float16)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_reference_equals_pad_slice_flip_construction(mode):
    """Independent of basic's gather: F.pad the batch, slice each crop, flip, normalise by hand, fill the boxes
    by loops in order (the later box wins where boxes overlap)."""
    p, kinds = 4, ("constant", "zero", "constant")
    a = _inputs(6, 32, 32, p, len(kinds), seed=3)
    got = crop_flip_erase_reference(a["source"], a["idx"], a["oy"], a["ox"], a["flip"], a["boxes"], kinds,
                                    a["fill_value"], MEAN, STD, padding=p, mode=mode, out_dtype=torch.float32)
    padded = F.pad(a["source"][a["idx"]].permute(0, 3, 1, 2).float(), (p, p, p, p), mode=mode)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i in range(6):
        oy, ox = int(a["oy"][i]), int(a["ox"][i])
        crop = padded[i, :, oy:oy + 32, ox:ox + 32]
        crop = crop.flip(-1) if a["flip"][i] else crop
        want = (crop / 255.0 - m) / s
        for k, kind in enumerate(kinds):
            t, l, h, w = a["boxes"][i, k].tolist()
            want[:, t:t + h, l:l + w] = 0.0 if kind == "zero" else a["fill_value"][k].view(3, 1, 1)
        # normalize folds (x/255 - m)/s into x*scale + shift: a few float32 ulps from the spelled-out formula
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-6)


def test_dispatch_on_cpu_is_the_reference():
    a = _random_args()
    got = _random_call(fused_crop_flip_erase, a, gen=torch.Generator().manual_seed(1))
    assert torch.equal(got, _random_call(crop_flip_erase_reference, a, gen=torch.Generator().manual_seed(1)))


def test_bad_arguments_are_refused(monkeypatch):
    a = _inputs(2, 8, 8, 8, 0, seed=4)
    call = dict(fill_kind=(), fill_value=a.pop("fill_value"), mean=MEAN, std=STD, out_dtype=torch.float32)
    with pytest.raises(RecipeError, match="crop_padding"):  # reflect cannot mirror 8 px of an 8 px image
        crop_flip_erase_reference(**a, **call, padding=8, mode="reflect")
    crop_flip_erase_reference(**a, **call, padding=8, mode="constant")  # zero padding has no such limit
    with pytest.raises(ValueError, match="fill_kind"):
        crop_flip_erase_reference(**{**a, "boxes": torch.zeros(2, 1, 4, dtype=torch.long)},
                                  **{**call, "fill_kind": ("noise",), "fill_value": torch.zeros(1, 3)}, padding=0,
                                  mode="constant")
    with pytest.raises(ValueError, match="uint8"):
        crop_flip_erase_reference(**{**a, "source": a["source"].float()}, **call, padding=0, mode="constant")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        crop_flip_erase_triton(**a, **call, padding=0, mode="constant")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on a lent GPU)")
@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_cuda_kernel_equals_reference_full_size(mode, dtype):
    dev = torch.device("cuda")
    kinds = ("constant", "zero", "constant")
    a = _inputs(512, 32, 32, 4, len(kinds), seed=10, n=2000, device=dev)
    args = (a["source"], a["idx"], a["oy"], a["ox"], a["flip"], a["boxes"], kinds, a["fill_value"], MEAN, STD)
    kw = dict(padding=4, mode=mode, out_dtype=dtype)
    got = crop_flip_erase_triton(*args, **kw)
    torch.testing.assert_close(got, crop_flip_erase_reference(*args, **kw), rtol=0, atol=0)
    assert torch.equal(fused_crop_flip_erase(*args, **kw), got)  # dispatch takes the kernel on CUDA
    r = _random_args(dev, b=512)
    noisy = _random_call(crop_flip_erase_triton, r, dtype, seed=3)
    ref = _random_call(crop_flip_erase_reference, r, dtype, gen=torch.Generator(dev).manual_seed(0))
    box = _box_mask({"boxes": r["boxes"].cpu()}, [0, 1]) & ~_box_mask({"boxes": r["boxes"].cpu()}, [2])
    box = box.to(dev).expand_as(noisy)
    assert torch.equal(noisy[~box], ref[~box])
    noise = noisy[box].float()
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01  # ~880k values: sd ~0.001
