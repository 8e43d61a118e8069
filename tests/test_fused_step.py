"""train.compile_step: the whole training step (forward, loss, gradients, the optimizer update) compiled as one
graph without a graph break, trained like the eager step, and refused where it cannot apply."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fastcifar import engine
from fastcifar.cli import main
from fastcifar.errors import RecipeError
from fastcifar.fused_step import FusedStep
from fastcifar.models import create_model
from fastcifar.optim import build_optimizer
from fastcifar.recipe import OptimCfg


def _fused(model, backend: str = "aot_eager", total: int = 100):
    cfg = OptimCfg(name="muon", muon_impl="batched", muon_ns_steps=3, muon_renorm="adaptive", nesterov=True,
                   momentum=0.85, lr=0.2, weight_decay=5e-4, muon_lr=0.1, muon_momentum=0.6)
    opt = build_optimizer(cfg, list(model.parameters()), torch.device("cpu"), total_steps=total)
    return opt, FusedStep(model, opt, torch.device("cpu"), None, 0.2, backend)


def test_compiled_step_is_one_graph_with_the_optimizer_in_it():
    """torch._dynamo.explain over the whole step (forward, loss, autograd.grad, batched Muon + SGD update): one
    graph, no break; and again after the whitening bias freezes (another trainable set: a recompile, no break)."""
    torch.manual_seed(0)
    model = create_model("speedrun_net", width=4)
    _, fused = _fused(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for frozen in (False, True):
        model.whiten.bias.requires_grad_(not frozen)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            explained = torch._dynamo.explain(fused._step)(x, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_step_trains_like_the_eager_step():
    """4 steps through FusedStep (AOTAutograd's traced program, what inductor compiles) beside loss.backward() and
    the same optimizer's eager step: the same weights and BN statistics (to 1e-6), the same Muon counters."""
    torch.manual_seed(0)
    eager = create_model("speedrun_net", width=4)
    model = copy.deepcopy(eager)
    opt_e, _ = _fused(eager)
    opt_f, fused = _fused(model)
    for step in range(4):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt_e.zero_grad()
        loss = F.cross_entropy(eager(x).float(), y, label_smoothing=0.2)
        loss.backward()
        opt_e.step()
        got, _ = fused(x, y)
        torch.testing.assert_close(got, loss.detach())
        for opt in (opt_e, opt_f):
            for g in opt.param_groups:
                g["lr"] *= 0.9  # a schedule: new values, no recompile
        for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"step {step + 1}: {name}")
    assert opt_f.muon.counters.tolist() == opt_e.muon.counters.tolist() == [4, 4]  # renormalised at 2 and 4


def test_compile_step_trains_from_the_cli_and_refuses_what_it_cannot_do(store, tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")  # inductor's C++ build: minutes on 2 cores
    out = tmp_path / "run"
    sets = [f'data.store="{store}"', "model.width=4", "train.batch_size=40", "train.epochs=2",
            "train.compile=false", "train.amp=false", "train.compile_step=true", "eval.batch_size=80",
            "optim.muon_impl=\"batched\"", "optim.muon_ns_steps=3"]
    argv = ["train", "speedrun94_muon", "--device", "cpu", "--out", str(out)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["engine"]["compile_step"] is True and 0.0 <= result["test_acc"] <= 1.0
    with pytest.raises(RecipeError, match='train.compile_step: needs optim.name = "sgd", or "muon" with '
                                          'optim.muon_impl = "batched", got \'muon\' with muon_impl \'torch\''):
        tiny(optim={"name": "muon"}, train={"compile_step": True})
    with pytest.raises(RecipeError, match="train.grad_clip: cannot be used with train.compile_step"):
        tiny(train={"compile_step": True, "grad_clip": 1.0})


def test_a_compiled_step_run_resumes_mid_epoch_bit_identical(tiny, tmp_path, monkeypatch):
    """Stopped at epoch 2 step 3 and resumed, a train.compile_step run ends on the same weights as an uninterrupted
    one: the resumed optimizer's state (new groups, new buffers from load_state_dict) is what the step uses."""
    from resume import full_and_resumed

    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    recipe = tiny(model={"name": "speedrun_net", "width": 4, "whiten_bias_epochs": 1},
                  optim={"name": "muon", "muon_impl": "batched", "muon_ns_steps": 3, "muon_renorm": "adaptive",
                         "lr": 0.05}, schedule={"name": "linear"}, train={"epochs": 3, "compile_step": True})
    full, _, _ = full_and_resumed(recipe, tmp_path, epoch=1, step=3)
    assert json.loads((full / "result.json").read_text())["engine"]["compile_step"] is True



def test_every_compiled_step_compiles_however_many_came_before():
    """dynamo stops compiling a code object after recompile_limit (8) cache entries that match the objects of the
    call, and runs it eagerly from then on; a freed step's entries can match a new step's objects (CPython reuses
    their addresses). Ten compiled steps one after another (a k-fold run's folds, a stopped and a resumed run) all
    compile: on one shared code object a resumed compile_step run stepped eagerly (not bit-identical)."""
    assert torch._dynamo.config.recompile_limit < 10
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for seed in range(10):
            torch.manual_seed(seed)
            model = create_model("speedrun_net", width=4)
            _, fused = _fused(model, backend="eager")
            loss, _ = fused(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
            assert torch.isfinite(loss)
            del model, fused
