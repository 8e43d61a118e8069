"""What the current records do, as our own recipe options, each checked against the peer's own function (imported
from the unchanged peer file: tests/conftest.py's `peer` fixture): batched Newton-Schulz Muon, brightness /
contrast jitter, selective TTA with Hiverge's six views, SiLU groups, SVD whitening, the linear decay."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from fastcifar.augment.basic import shift_jitter
from fastcifar.augment.pipeline import build_train_transform, fusable
from fastcifar.bench.peers import CpuRedirect, peer_on_cpu
from fastcifar.errors import RecipeError
from fastcifar.evaluate import evaluate, selective_tta_logits
from fastcifar.models import create_model
from fastcifar.models.speedrun import ConvGroup, SpeedrunNet
from fastcifar.muon import BatchedMuon, orthogonalize
from fastcifar.optim import build_scheduler
from fastcifar.recipe import AugmentCfg, OptimCfg, ScheduleCfg

HIVERGE_NS = (3.4576, -4.7391, 2.0843)
AIRBENCH_NS = (3.4445, -4.7750, 2.0315)
SHAPES = [(8, 24, 3, 3), (8, 8, 3, 3), (32, 8, 3, 3), (32, 32, 3, 3), (32, 32, 3, 3)]  # speedrun_net at width 8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------- batched Muon


def test_batched_newton_schulz_is_hiverge_s(peer):
    """orthogonalize == Hiverge's _zeropower_via_newtonschulz5 on the same gradients (fp32, 3 steps). Its
    magnitude pre-scaling cancels in its second normalisation up to its eps = 1e-5: relative error < 1e-3."""
    hv = peer("hiverge")
    torch.manual_seed(0)
    grads = [torch.randn(s) for s in SHAPES]
    theirs_opt = hv.Muon([torch.nn.Parameter(torch.zeros(s)) for s in SHAPES], total_train_steps=10)
    meta = [(m["original_shape"], *m["reshaped_dims"], i) for i, m in enumerate(theirs_opt.filter_params_meta)]
    theirs = hv._zeropower_via_newtonschulz5(grads, meta, theirs_opt.max_D, theirs_opt.max_K, 3, 10)
    ours = orthogonalize([g.reshape(len(g), -1) for g in grads], HIVERGE_NS, 3)
    for a, b in zip(ours, theirs):
        assert _rel(a.view(b.shape), b) < 1e-3
    tall = orthogonalize([grads[2].reshape(32, -1).T], HIVERGE_NS, 3)[0]  # a tall matrix: NS of the transpose
    torch.testing.assert_close(tall, ours[2].T, rtol=1e-5, atol=1e-6)


def test_batched_muon_follows_hiverge_step_for_step(peer):
    """24 steps of BatchedMuon (renorm "adaptive", weight decay after the update) beside Hiverge's own Muon.step
    (its fp16 momentum buffer in fp32, as the harness runs it on the CPU), the same gradients and linear lr decay:
    the filters agree to 1e-4 after every step and renormalise on the same steps (when t - last >= 2 +
    floor(15 t / T): steps 3 and 11 of 24)."""
    hv = peer("hiverge")
    torch.manual_seed(1)
    theirs = [torch.nn.Parameter(torch.randn(s) * 0.2) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    total, wd = 24, 1.0418e-6 * 1536
    with CpuRedirect(torch.float32):
        opt_t = hv.Muon(theirs, lr=0.205, momentum=0.655, nesterov=True, norm_freq=4, total_train_steps=total,
                        weight_decay=wd)
    opt_t.param_groups[0]["momentum_buffer_dtype"] = torch.half  # what their main() sets
    opt_o = BatchedMuon(ours, lr=0.205, momentum=0.655, nesterov=True, weight_decay=wd, coefficients=HIVERGE_NS,
                        ns_steps=3, renorm="adaptive", total_steps=total)
    renormalised = []
    for step in range(total):
        grads = [torch.randn(s) for s in SHAPES]
        for params, opt in ((theirs, opt_t), (ours, opt_o)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.param_groups[0]["lr"] = 0.205 * (1 - step / total)
        with CpuRedirect(torch.float32):
            opt_t.step()
        opt_o.step()
        assert int(opt_o.counters[1]) == opt_t.last_norm_step
        renormalised.append(opt_t.last_norm_step)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-4, msg=f"step {step + 1}")
    assert sorted(set(renormalised)) == [0, 3, 11]


def test_batched_newton_schulz_in_bf16_is_airbench94_muon_s(peer):
    """orthogonalize in bf16 with airbench94_muon's coefficients and 3 steps beside its own per-filter
    zeropower_via_newtonschulz5: both are as far from the same iteration in fp64 (bf16 rounding, batched matmuls
    rounding differently from single ones), and within 5e-2 of each other."""
    ab = peer("airbench94_muon")
    torch.manual_seed(8)
    grads = [torch.randn(s).reshape(s[0], -1) for s in SHAPES]
    ours = orthogonalize(grads, AIRBENCH_NS, 3, torch.bfloat16)
    exact = orthogonalize([g.double() for g in grads], AIRBENCH_NS, 3)
    for g, o, e in zip(grads, ours, exact):
        theirs = ab.zeropower_via_newtonschulz5(g)
        assert theirs.dtype == o.dtype == torch.bfloat16
        assert _rel(o, e) < 1.5 * _rel(theirs, e) + 1e-3 and _rel(o, theirs) < 5e-2


def test_batched_muon_matches_airbench94_muon_s_step(peer):
    """BatchedMuon with airbench94_muon's settings (coefficients, 3 bf16 steps, renormalised every step) beside
    its own Muon.step, 5 steps: the weights agree to 1e-2 relative and each step's change to 5e-2 (bf16
    Newton-Schulz, see above)."""
    ab = peer("airbench94_muon")
    torch.manual_seed(2)
    theirs = [torch.nn.Parameter(torch.randn(s) * 0.2) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt_t = ab.Muon(theirs, lr=0.24, momentum=0.6, nesterov=True)
    opt_o = BatchedMuon(ours, lr=0.24, momentum=0.6, nesterov=True, coefficients=AIRBENCH_NS, ns_steps=3,
                        renorm="every", ns_dtype=torch.bfloat16)
    for step in range(5):
        before = [p.detach().clone() for p in theirs]
        grads = [torch.randn(s) for s in SHAPES]
        for params, opt in ((theirs, opt_t), (ours, opt_o)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for a, b, b0 in zip(ours, theirs, before):
            assert _rel(a.detach(), b.detach()) < 1e-2, f"step {step + 1}"
            assert _rel(a.detach() - b0, b.detach() - b0) < 5e-2  # the step itself, not only the weights


def test_batched_muon_is_one_newton_schulz_call_per_step(monkeypatch):
    import fastcifar.muon as muon

    calls = []
    real = muon.orthogonalize
    monkeypatch.setattr(muon, "orthogonalize", lambda mats, *a, **k: calls.append(len(mats)) or real(mats, *a, **k))
    model = create_model("speedrun_net", width=8)
    cfg = OptimCfg(name="muon", muon_impl="batched", muon_ns_steps=3, muon_renorm="adaptive", nesterov=True,
                   momentum=0.85, lr=0.1)
    from fastcifar.optim import build_optimizer

    opt = build_optimizer(cfg, list(model.parameters()), torch.device("cpu"), total_steps=40)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
    assert calls == [6, 6, 6]  # six conv filters, one call a step
    again = build_optimizer(cfg, list(model.parameters()), torch.device("cpu"), total_steps=40)
    again.load_state_dict(opt.state_dict())
    assert again.muon.counters.tolist() == opt.muon.counters.tolist() == [3, 2]  # renormalised at step 2


def test_batched_options_need_the_batched_muon():
    with pytest.raises(RecipeError, match='optim.muon_renorm: applies to optim.muon_impl = "batched" only'):
        OptimCfg(name="muon", muon_renorm="every").validate()


# ---------------------------------------------------------------------------------------------- jitter


def test_shift_jitter_is_hiverge_s_on_the_same_draws(peer):
    hv = peer("hiverge")
    x = torch.randn(16, 3, 8, 8)
    torch.manual_seed(5)
    theirs = hv.batch_color_jitter(x, 0.1399, 0.1308)
    ours = shift_jitter(x, 0.1399, 0.1308, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_shift_jitter_in_pixel_units_is_torchvision_s_contrast_about_the_mean():
    """Contrast: with the image's own grey mean as the normalisation mean (std s), the jittered pixels are v2's
    adjust_contrast(x, k) for the same factor k. Brightness: a shift of b std units adds b * s to every pixel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 8, 8, generator=gen) * 0.4 + 0.3  # nothing clamps at 0 or 1
    mean = TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    s = 0.25
    draws = torch.Generator().manual_seed(9)
    torch.rand(4, generator=draws)  # the brightness draws come first
    k = (torch.rand(4, generator=draws) * 2 - 1) * 0.3 + 1
    y = shift_jitter((x - mean) / s, 0.0, 0.3, torch.Generator().manual_seed(9)) * s + mean
    want = torch.stack([TF.adjust_contrast(xi, float(ki)) for xi, ki in zip(x, k)])
    torch.testing.assert_close(y, want, rtol=0, atol=2e-6)
    shift = (torch.rand(4, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 0.2
    y = shift_jitter((x - mean) / s, 0.2, 0.0, torch.Generator().manual_seed(4)) * s + mean
    torch.testing.assert_close(y, x + shift.view(-1, 1, 1, 1) * s, rtol=0, atol=2e-6)


def test_shift_jitter_runs_after_the_fused_crop_flip_normalise(store):
    from fastcifar.data import open_store

    images = torch.from_numpy(open_store(store).train_images[:12].copy())
    idx = torch.arange(12)
    base = AugmentCfg(flip=True, flip_mode="alternate", crop_padding=2)
    jitter = AugmentCfg(flip=True, flip_mode="alternate", crop_padding=2, shift_jitter=(0.14, 0.13))
    assert fusable(jitter) and not fusable(AugmentCfg(shift_jitter=(0.1, 0.1), cutout=8))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = build_train_transform(base, mean, std)(images, idx, g1, 1)
    torch.testing.assert_close(build_train_transform(jitter, mean, std)(images, idx, g2, 1),
                               shift_jitter(plain, 0.14, 0.13, g1), rtol=0, atol=0)
    with pytest.raises(RecipeError, match="augment.shift_jitter"):
        AugmentCfg(shift_jitter=(0.1, 1.5)).validate()


# ---------------------------------------------------------------------------------------------- selective TTA


class _Batches(list):
    """A list of (x, y) batches with the .labels an evaluation loader has."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int):
        super().__init__(zip(x.split(size), y.split(size)))
        self.labels, self.batch_size = y, size


def test_selective_tta_is_hiverge_s(peer):
    """Plain logits for all 40 images, Hiverge's six views (1/6 each) for the 10 least confident: the same logits
    as its own infer(model, loader, tta_level=2), batch boundaries notwithstanding."""
    hv = peer("hiverge")
    torch.manual_seed(4)
    model = create_model("speedrun_net", width=8).eval()
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    with peer_on_cpu():  # their infer compiles its TTA functions when called: the shim makes that a no-op
        theirs = hv.infer(model, types.SimpleNamespace(images=x, normalize=lambda t: t), tta_level=2)
    ours, info = selective_tta_logits(model, _Batches(x, y, 16), torch.device("cpu"), None,
                                      "flip_translate_mean", 0.25)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert info["tta_images"] == 10 and info["tta_fraction"] == 0.25
    with torch.no_grad():
        conf = model(x).softmax(1).amax(1)
    changed = (ours != model(x).detach()).any(1)
    assert changed.sum() == 10 and conf[changed].max() == pytest.approx(info["tta_confidence_max"])
    assert conf[~changed].min() > conf[changed].max()  # exactly the least confident got the views
    full = evaluate(model, _Batches(x, y, 16), torch.device("cpu"), None, 10, tta="flip_translate_mean",
                    tta_fraction=0.25)
    assert full["tta_selection"] == info and full["acc"] == pytest.approx((ours.argmax(1) == y).double().mean())
    seen = []  # the views run on chunks of the batch size whichever images were chosen: 20 -> 16 + 4
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    selective_tta_logits(model, _Batches(x, y, 16), torch.device("cpu"), None, "flip_translate_mean", 0.5)
    assert seen == [16, 16, 8] + [16] * 6 + [4] * 6


# ---------------------------------------------------------------------------------------------- the model


def test_silu_group_is_hiverge_s_conv_group(peer):
    """Our ConvGroup(activation="silu") with Hiverge's weights computes what its ConvGroup does (training mode:
    batch statistics; our BN shift is stored divided by its gain)."""
    hv = peer("hiverge")
    torch.manual_seed(6)
    with peer_on_cpu():
        theirs = hv.ConvGroup(24, 16)
    ours = ConvGroup(24, 16, bn_momentum=1 - 0.5566, bias_lr_scale=64.0, activation="silu")
    with torch.no_grad():
        ours.conv1.weight.copy_(theirs.conv1.weight)
        ours.conv2.weight.copy_(theirs.conv2.weight)
        for a, b in ((ours.norm1, theirs.norm1), (ours.norm2, theirs.norm2)):
            b.bias.normal_()
            a.bias.copy_(b.bias / a.bias_gain)
    x = torch.randn(8, 24, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert isinstance(create_model("speedrun_net", width=8, activation="silu").group2.act2, torch.nn.SiLU)


def test_svd_whitening_is_hiverge_s_init(peer):
    """whiten_init = "svd" gives Hiverge's init_whiten filters on the same images: equal up to each filter's
    sign (fp64 covariance here, fp32 there: 1e-3), every filter beside its negation."""
    hv = peer("hiverge")
    gen = torch.Generator().manual_seed(7)
    mix = torch.tensor([[1.0, 0.8, 0.3], [0.2, 1.0, 0.5], [0.1, 0.4, 1.0]])
    x = F.avg_pool2d(torch.einsum("ij,njhw->nihw", mix, torch.randn(48, 3, 32, 32, generator=gen)), 3, 1, 1) * 3
    with peer_on_cpu():
        theirs = hv.CifarNet()
    theirs.init_whiten(x)
    w_t = theirs.whiten.weight.detach()
    ours = SpeedrunNet(widths=(8, 16, 16), whiten_init="svd")
    ours.init_whitening(x)
    w_o = ours.whiten.weight
    for i in range(12):
        sign = torch.sign((w_o[i] * w_t[i]).sum())
        torch.testing.assert_close(w_o[i] * sign, w_t[i], rtol=1e-3, atol=1e-3 * w_t[i].abs().max().item())
        torch.testing.assert_close(w_o[i + 12], -w_o[i])
    eigh = SpeedrunNet(widths=(8, 16, 16))
    eigh.init_whitening(x)
    torch.testing.assert_close(eigh.whiten.weight.abs(), w_o.abs(), rtol=1e-4, atol=1e-6)  # same filters, signs


# ---------------------------------------------------------------------------------------------- the schedule


def test_linear_schedule_is_the_records_decay(peers_dir):
    """Hiverge's main(): lr = initial * (1 - step / total_train_steps) at step 0, 1, ... (and airbench94_muon's)."""
    text = (peers_dir / "hiverge_speedrun" / "cifar10_speedrun.py").read_text()
    assert "lr_factor2 = 1 - step * lr_factor2_base" in text and "lr_factor2_base = 1.0 / total_train_steps" in text
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimCfg(lr=0.5415, momentum=0.825, nesterov=True)
    opt = torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sched = build_scheduler(ScheduleCfg(name="linear"), cfg, opt, 32, 8, total_steps=243)
    for step in range(243):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5415 * (1 - step * (1.0 / 243)), rel=1e-12, abs=1e-15)
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()


# ---------------------------------------------------------------------------------------------- the recipe


def _number(text: str, pattern: str) -> float:
    import re

    match = re.search(pattern, text)
    assert match, pattern
    return float(match.group(1))


def test_record_recipe_is_hiverge_s_hyper_parameters_translated(peers_dir):
    """Every number of recipes/speedrun94_record.toml that has a Hiverge counterpart follows from the one in its
    file by the conversions the recipe's comments state (summed -> mean loss at B = 1536, logit scale 1/256 with
    a unit-std head -> 1/9 with torch's default head, per-group wd / lr -> one decay a step)."""
    from fastcifar.bench.peers import PEERS, peer_steps
    from fastcifar.recipe import load_recipe

    text = (peers_dir / PEERS["hiverge"].path).read_text()
    num = lambda p: _number(text, p)  # noqa: E731
    batch = num(r"training_batch_size = (\d+)")
    head_lr, bias_lr = num(r"head_lr = ([\d.]+)"), num(r"bias_lr = ([\d.]+)")
    wd = num(r"wd = ([\d.e-]+) \* training_batch_size") * batch
    r = load_recipe("speedrun94_record")
    assert r.optim.lr == pytest.approx(head_lr * batch * (9 / 256) ** 2, rel=1e-3)
    assert r.optim.lr * r.model.bias_lr_scale == pytest.approx(bias_lr * batch, rel=1e-3)
    assert r.optim.lr * r.optim.weight_decay == pytest.approx(wd, rel=1e-3)
    assert r.optim.muon_weight_decay == pytest.approx(wd, rel=1e-4)
    assert r.optim.momentum == num(r"momentum=([\d.]+), nesterov=True, fused=True")
    assert r.optim.muon_lr == num(r"Muon\(\s+filter_params,\s+lr=([\d.]+),")
    assert r.optim.muon_momentum == num(r"Muon\(\s+filter_params,\s+lr=[\d.]+,\s+momentum=([\d.]+),")
    assert r.optim.muon_ns_coefficients == HIVERGE_NS and "a, b, c = (3.4576, -4.7391, 2.0843)" in text
    assert r.model.bn_momentum == pytest.approx(1 - num(r"def __init__\(self, num_features, momentum=([\d.]+)"))
    assert r.train.label_smoothing == num(r"label_smoothing=([\d.]+)")
    assert list(r.augment.shift_jitter) == [num(r'"brightness_range": ([\d.]+)'), num(r'"contrast_range": ([\d.]+)')]
    assert r.eval.tta_fraction == num(r"UNCERTAIN_QUANTILE = ([\d.]+)") and r.eval.tta == "flip_translate_mean"
    assert r.train.batch_size == batch and r.train.steps == peer_steps(PEERS["hiverge"], 50_000) == 243
    assert (r.model.activation, r.model.whiten_init, r.schedule.name) == ("silu", "svd", "linear")
    assert (r.optim.muon_impl, r.optim.muon_renorm, r.optim.muon_ns_steps) == ("batched", "adaptive", 3)


def test_record_recipe_trains_a_tiny_run(store, tmp_path, monkeypatch):
    import json

    from fastcifar import engine
    from fastcifar.cli import main

    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")  # the one-graph step, without a C++ build
    out = tmp_path / "run"
    sets = [f'data.store="{store}"', "data.train_subset=8", "model.width=4", "train.batch_size=40", "train.epochs=2",
            "train.steps=3", "train.compile=false", "train.amp=false", "eval.batch_size=80"]
    assert main(["train", "speedrun94_record", "--device", "cpu", "--out", str(out)]
                + [a for s in sets for a in ("--set", s)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["engine"]["compile_step"] and result["engine"]["tta_fraction"] == 0.25
    assert result["tta_selection"]["tta_images"] == 20  # a quarter of the tiny store's 80 test images
