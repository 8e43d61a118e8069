"""The speed-tier techniques, each by its mechanics: Lookahead's slow weights, Muon's orthogonalised update on the
conv filters, constant momentum under OneCycle, the whitening bias frozen after n epochs; exact resume with
them; and the tier recipes training a tiny epoch on the CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fastcifar.checkpoint import load_checkpoint
from fastcifar.errors import RecipeError
from fastcifar.models import create_model
from fastcifar.optim import Lookahead, MuonFilters, build_optimizer, build_scheduler
from fastcifar.recipe import OptimCfg, ScheduleCfg, load_recipe
from fastcifar.run import run_training
from resume import full_and_resumed

RECIPES = Path(__file__).parent.parent / "recipes"
QUIET = Console(quiet=True)


def test_lookahead_pulls_weights_to_the_slow_copy_on_its_schedule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    look = Lookahead(model, every=2, decay=0.5, power=1.0, total_steps=4)
    slow = 0.0
    for step, w in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            model.weight.fill_(w)  # what an optimizer step would have set
        look.after_step()
        if step == 2:  # d = 0.5 * (2 / 4) = 0.25: slow = 0 + 0.75 * (2 - 0), weights = slow
            slow = slow + (1 - 0.25) * (2.0 - slow)
        elif step == 4:  # the last step is a pull step: d = 0.5 * (4 / 4) = 0.5 first, then the run ends on slow
            slow = slow + (1 - 0.5) * (4.0 - slow)
        else:  # steps 1 and 3: untouched
            assert model.weight.item() == w
            continue
        assert model.weight.item() == pytest.approx(slow) and look.slow[0].item() == pytest.approx(slow)
    assert look.state_dict()["steps"] == 4


@pytest.mark.parametrize("total", [20, 22])  # the last step a pull step (as airbench94's 9.9 epochs are not) or not
def test_lookahead_follows_airbench_step_for_step(total):
    """Our Lookahead beside airbench's own LookaheadState driven as its train() drives it (every 5 steps with
    alpha_schedule[step], then decay 1.0 at the last step), over the same weight trajectory."""
    ab_utils = pytest.importorskip("airbench.utils")
    torch.manual_seed(0)
    ours, theirs = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)  # parameters and float buffers
    theirs.load_state_dict(ours.state_dict())
    look = Lookahead(ours, every=5, decay=0.95**5, power=3.0, total_steps=total)
    state = ab_utils.LookaheadState(theirs)
    alpha = 0.95**5 * (torch.arange(total + 1) / total) ** 3
    for step in range(1, total + 1):
        nudge = {k: torch.randn_like(v) for k, v in ours.state_dict().items() if v.is_floating_point()}
        for net in (ours, theirs):  # what an optimizer step (and BN's running stats) would have done
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if k in nudge:
                        v.add_(nudge[k])
        look.after_step()
        if step % 5 == 0:
            state.update(theirs, decay=alpha[step].item())
        if step >= total:
            state.update(theirs, decay=1.0)
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"step {step}: {k}")


@pytest.mark.parametrize("total", [144, 476])  # speedrun94 at 3 CPU epochs; airbench94's 9.9 epochs
def test_triangle_schedule_is_airbench_s_step_for_step(total):
    """airbench's train(): lr_schedule = piecewise linear through (0, 0.2), (int(0.23 T), 1), (T, 0.07), step i at
    lr_schedule[i]; both of Muon's groups scaled alike, momentum untouched."""
    cfg = OptimCfg(name="muon", lr=1.5, momentum=0.85, nesterov=True, muon_lr=0.05)
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = build_optimizer(cfg, [conv.weight, conv.bias], torch.device("cpu"))
    sched = build_scheduler(ScheduleCfg(name="triangle", pct_start=0.23, div_factor=5.0,
                                        final_div_factor=0.2 / 0.07), cfg, opt, total // 4, 4)
    airbench = np.interp(np.arange(total), [0, int(0.23 * total), total], [0.2, 1.0, 0.07])
    momenta = [g["momentum"] for g in opt.param_groups]
    for i in range(total):
        got = [g["lr"] / base for g, base in zip(opt.param_groups, (0.05, 1.5))]
        assert got == pytest.approx([airbench[i]] * 2, rel=1e-12), f"step {i}"
        opt.step()
        sched.step()
    assert [g["momentum"] for g in opt.param_groups] == momenta == [0.95, 0.85]  # Muon's own, SGD's


def test_triangle_has_its_own_warm_up():
    with pytest.raises(RecipeError, match="schedule.warmup_epochs: must be 0 with triangle"):
        ScheduleCfg(name="triangle", warmup_epochs=1.0).validate()


def test_muon_orthogonalises_the_flattened_filter_update_exactly_as_torch_does():
    torch.manual_seed(0)
    conv, bias = torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.Parameter(torch.zeros(6))
    cfg = OptimCfg(name="muon", lr=0.1, momentum=0.9, nesterov=True, muon_lr=0.05, muon_momentum=0.0)
    opt = build_optimizer(cfg, [conv.weight, bias], torch.device("cpu"))
    assert isinstance(opt, MuonFilters) and len(opt.param_groups) == 2
    grad = torch.randn_like(conv.weight)
    reference = torch.nn.Parameter(conv.weight.detach().view(6, -1).clone())  # torch's Muon on the matrix itself
    ref_opt = torch.optim.Muon([reference], lr=0.05, momentum=0.0, nesterov=True, weight_decay=0.0)
    reference.grad = grad.view(6, -1).clone()
    ref_opt.step()
    before = conv.weight.detach().clone()
    conv.weight.grad, bias.grad = grad.clone(), torch.zeros(6)
    opt.step()
    torch.testing.assert_close(conv.weight.detach().view(6, -1), reference.detach(), rtol=0, atol=0)
    update = (before - conv.weight.detach()).view(6, -1) / 0.05  # Newton-Schulz: singular values near 1
    assert torch.linalg.svdvals(update).sub(1).abs().max() < 0.35
    assert torch.linalg.matrix_rank(update) == 6


def test_muon_state_round_trips_and_the_schedule_scales_both_groups():
    conv = torch.nn.Conv2d(2, 4, 3)
    cfg = OptimCfg(name="muon", lr=0.2, momentum=0.85, nesterov=True, muon_lr=0.02)
    opt = build_optimizer(cfg, list(conv.parameters()), torch.device("cpu"))
    sched = build_scheduler(ScheduleCfg(name="onecycle", max_lr=0.4, cycle_momentum=False), cfg, opt, 5, 2)
    peaks = [g["max_lr"] for g in opt.param_groups]
    assert peaks == pytest.approx([0.04, 0.4])  # each group peaks at 2x its own base lr
    for _ in range(3):
        for p in conv.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    again = build_optimizer(cfg, list(conv.parameters()), torch.device("cpu"))
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    assert [g["momentum"] for g in opt.param_groups] == [0.95, 0.85]  # not cycled


def test_onecycle_keeps_momentum_constant_when_asked():
    for cycle, expect_constant in ((True, False), (False, True)):
        p = torch.nn.Parameter(torch.zeros(1))
        cfg = OptimCfg(lr=0.1, momentum=0.85, nesterov=True)
        opt = build_optimizer(cfg, [p], torch.device("cpu"))
        sched = build_scheduler(ScheduleCfg(cycle_momentum=cycle), cfg, opt, 10, 1)
        seen = set()
        for _ in range(9):
            p.grad = torch.zeros(1)
            opt.step()
            sched.step()
            seen.add(round(opt.param_groups[0]["momentum"], 6))
        assert (seen == {0.85}) == expect_constant


def _speedrun(tiny, **train):
    return tiny(model={"name": "speedrun_net", "width": 8, "whiten_bias_epochs": 1},
                optim={"lookahead_every": 2, "lr": 0.05}, schedule={"cycle_momentum": False},
                train={"epochs": 3, **train})


def test_the_whitening_bias_is_frozen_after_its_epochs(tiny, tmp_path):
    from fastcifar.context import Hooks

    biases = []

    def on_epoch_end(epoch):
        biases.append(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]["whiten.bias"])

    run_training(_speedrun(tiny), tmp_path / "run", QUIET, hooks=Hooks(on_epoch_end=on_epoch_end))
    assert not torch.equal(biases[0], torch.zeros_like(biases[0]))  # epoch 1 trained it
    torch.testing.assert_close(biases[1], biases[2], rtol=0, atol=0)  # frozen from epoch 2 on


def test_lookahead_and_frozen_bias_resume_mid_epoch_bit_identical(tiny, tmp_path):
    full, cut, _ = full_and_resumed(_speedrun(tiny), tmp_path, epoch=1, step=3)
    assert load_checkpoint(full / "checkpoints" / "last.pt")["lookahead"]["steps"] == 21  # 3 epochs x 7 steps


@pytest.mark.parametrize("name", ["speedrun94", "speedrun94_muon", "speedrun95", "speedrun96", "seed000_fast"])
def test_tier_recipes_train_a_tiny_epoch(store, tmp_path, name):
    overrides = [f'data.store="{store}"', "data.train_subset=2", "train.epochs=1", "train.batch_size=16",
                 "eval.batch_size=64", "eval.figures=false", "train.compile=false", "model.width=8"]
    if name == "seed000_fast":  # stratified k-fold on the merged pool, as the recipe; one fold, and k = 20 (not
        # the recipe's 5) so the fold validates 16 of the tiny store's 320 images, not 64
        overrides += ["split.k=20", "split.fold=0"]
    summary = run_training(load_recipe(RECIPES / f"{name}.toml", overrides), tmp_path / "run", QUIET)
    result = summary["folds"][0]
    assert 0.0 <= result["val_acc"] <= 1.0


def test_muon_on_channels_last_filters_updates_them_as_on_contiguous_ones():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 3, bias=False)
    grad = torch.randn_like(conv.weight)
    results = []
    for channels_last in (False, True):
        w = torch.nn.Parameter(conv.weight.detach().clone())
        if channels_last:
            w = torch.nn.Parameter(w.detach().contiguous(memory_format=torch.channels_last))
        opt = build_optimizer(OptimCfg(name="muon", muon_momentum=0.0), [w], torch.device("cpu"))
        w.grad = grad.clone()
        opt.step()
        results.append(w.detach().contiguous())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, variant", [("speedrun94", "94"), ("speedrun95", "95"), ("speedrun96", "96"),
                                           ("seed000_fast", "96")])
def test_tier_recipes_are_airbench_translated(name, variant):
    """Each tier's numbers follow from the airbench module it cites (airbench 0.1.8, in the [dev] extra): widths,
    epochs, augmentation, lr and weight decay converted from airbench's summed-loss, per-1024 form."""
    ab = pytest.importorskip(f"airbench.lib_airbench{variant}")
    opt, aug, net = ab.hyp["opt"], ab.hyp["aug"], ab.hyp["net"]
    r = load_recipe(RECIPES / f"{name}.toml")
    model = create_model(r.model.name, num_classes=10, image_size=32)
    widths = [g.conv1.out_channels for n, g in model.named_children() if n.startswith("group")]
    assert widths == [net["widths"][f"block{i}"] for i in (1, 2, 3)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(1 - net["batchnorm_momentum"]) for m in norms)  # torch: 1 - m
    assert model.scale.factor == net["scaling_factor"]
    assert r.train.epochs == round(opt["train_epochs"]) and r.train.batch_size == opt["batch_size"]
    assert r.train.label_smoothing == opt["label_smoothing"] and r.optim.momentum == opt["momentum"]
    assert r.model.whiten_bias_epochs == opt["whiten_bias_epochs"]
    # our mean loss over the batch: lr = airbench's lr / (1 + 1 / (1 - momentum)); the same per-step decay
    kilostep = 1 + 1 / (1 - opt["momentum"])
    assert r.optim.lr == pytest.approx(opt["lr"] / kilostep, rel=2e-3)
    assert r.optim.lr * r.optim.weight_decay == pytest.approx(opt["weight_decay"] / kilostep, rel=3e-3)
    assert (r.augment.crop_padding, r.augment.crop_padding_mode) == (aug["translate"], "reflect")
    assert r.augment.flip_mode == "alternate" and r.augment.translate == 0
    assert (r.augment.cutout, r.augment.cutout_mode if aug.get("cutout") else "-") == \
        (aug.get("cutout", 0), "inside" if aug.get("cutout") else "-")
    assert r.eval.tta == {2: "flip_translate", 1: "flip", 0: "none"}[net["tta_level"]]
    # airbench's train() hard-codes its schedule: triangle(start=0.2, peak=0.23, end=0.07), momentum constant
    assert (r.schedule.name, r.schedule.pct_start, r.schedule.warmup_epochs) == ("triangle", 0.23, 0.0)
    assert 1 / r.schedule.div_factor == pytest.approx(0.2)
    assert 1 / (r.schedule.div_factor * r.schedule.final_div_factor) == pytest.approx(0.07, rel=1e-12)
