"""fastcifar lr-find: the suggestion on a problem whose good range is known, the state left as it was, the
command's plot and --set line, per parameter group for Muon."""

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import tiny_table
from fastcifar.cli import main
from fastcifar.lrfind import Sweep, range_test, valley_index
from fastcifar.lrfind_run import prepare
from fastcifar.recipe import recipe_from_dict, recipe_to_toml

QUIET = Console(quiet=True)


def _quadratic(seed: int, noise: float):
    """Least squares on whitened inputs: the loss 0.5 mean((Xw - y)^2) has Hessian I, so SGD converges for
    lr < 2 (fastest near 1) and diverges above 2 — the good range is known before any sweep."""
    g = torch.Generator().manual_seed(seed)
    n, d = 4096, 16
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * n ** 0.5  # x.T @ x / n = I
    y = x @ torch.randn(d, 1, generator=g) + noise * torch.randn(n, 1, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pick = torch.Generator().manual_seed(seed + 1)

    def step() -> float:
        rows = torch.randint(0, n, (128,), generator=pick)  # mini-batches: a noisy loss, as in training
        loss = 0.5 * ((model(x[rows]) - y[rows]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return model, opt, step


@pytest.mark.parametrize("seed,noise", [(0, 0.1), (1, 0.5), (2, 1.0), (3, 2.0)])
def test_the_valley_falls_inside_the_known_good_range(seed, noise):
    model, opt, step = _quadratic(seed, noise)
    s = range_test(model, opt, step, 0, Sweep("all", "optim.lr"), start=1e-5, end=100.0, steps=100)
    assert s.stopped.startswith("diverged")
    assert 2.0 < s.lrs[-1] < 20.0  # it stops soon after the stability limit lr = 2, not before it
    # The good range (0.01, 2): below it the sweep has moved the weights < 6 % of the way (the plateau), above it
    # SGD diverges. Rules that misread the curve land outside it: the smoothed minimum sits past lr = 2 (the
    # lag of the average), and the steepest slope against raw lr (instead of log lr) falls in the noisy plateau.
    assert 0.01 < s.valley < 2.0, s.valley
    lrs, smooth = np.array(s.lrs), np.array(s.smoothed)
    assert lrs[np.argmin(smooth)] > 2.0
    assert lrs[1:][np.argmin(np.diff(smooth) / np.diff(lrs))] < 0.01


def test_valley_is_the_second_third_of_the_longest_descent():
    losses = np.array([5, 6, 5.5, 5, 4, 3, 2, 1, 0.5, 3, 9.0])  # the longest descent: indices 1..8 (8 points)
    # fastai's arithmetic: start = end - length = 0, a third of 8 is 2.67 -> 2, plus half of that -> 1
    assert valley_index(losses) == 0 + 2 + 1


def _recipe(tmp_path, store, **sections):
    path = tmp_path / "r.toml"
    table = tiny_table(store, **sections)
    table["train"] = {**table["train"], "threads": 1}
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    return path


def _args(recipe, out, *overrides, steps=30):
    return argparse.Namespace(recipe=str(recipe), overrides=list(overrides), steps=steps, start=1e-6, end=10.0,
                              rule="valley", out=str(out))


def _state(model, opt) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict()),
            "rng": torch.get_rng_state(), "modes": [m.training for m in model.modules()]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_sweep_leaves_weights_optimizer_and_rng_as_they_were(store, tmp_path):
    recipe = _recipe(tmp_path, store, optim={"name": "muon", "lr": 0.05})
    parts = prepare(_args(recipe, tmp_path / "lf"), QUIET)
    for _ in range(3):  # momentum buffers and BatchNorm statistics that are not the fresh ones
        parts.step()
    parts.model.eval()
    before = _state(parts.model, parts.runner.optimizer)
    for group in (0, 1):  # Muon's filters, then SGD's rest
        s = range_test(parts.model, parts.runner.optimizer, parts.step, group, Sweep("g", "k"), start=1e-5,
                       end=10.0, steps=20)
        assert len(s.lrs) > 5  # it really trained
    after = _state(parts.model, parts.runner.optimizer)
    assert _same(before["model"], after["model"]) and _same(before["opt"], after["opt"])
    assert torch.equal(before["rng"], after["rng"]) and before["modes"] == after["modes"]


def test_lr_find_writes_the_plot_and_suggests_a_set_line(store, tmp_path, capsys):
    recipe = _recipe(tmp_path, store)
    out = tmp_path / "lf"
    assert main(["lr-find", str(recipe), "--steps", "30", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "lr_find.json").read_text())
    (suggested,) = result["suggested"]
    assert suggested.startswith("optim.lr=") and f"--set {suggested}" in " ".join(text.split())
    sweep = result["sweeps"][0]
    assert float(suggested.split("=")[1]) == pytest.approx(sweep["valley"], rel=1e-2)
    assert 1e-6 <= sweep["valley"] <= 10.0 and len(sweep["lrs"]) == len(sweep["smoothed"]) > 10
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / ".fastcifar-lrfind").exists()


def test_a_muon_recipe_gets_one_sweep_per_parameter_group(store, tmp_path, capsys):
    recipe = _recipe(tmp_path, store, optim={"name": "muon", "lr": 0.05})
    out = tmp_path / "lf"
    assert main(["lr-find", str(recipe), "--steps", "20", "--out", str(out), "--rule", "steepest"]) == 0
    result = json.loads((out / "lr_find.json").read_text())
    assert [s["key"] for s in result["sweeps"]] == ["optim.muon_lr", "optim.lr"]
    assert [s.split("=")[0] for s in result["suggested"]] == ["optim.muon_lr", "optim.lr"]
    assert "the other groups frozen" in capsys.readouterr().out


@pytest.mark.parametrize("extra,expected", [
    (["--steps", "5"], "--steps: must be >= 10"),
    (["--start", "1", "--end", "0.1"], "need 0 < start < end"),
    (["--set", "optim.lr=-1"], "optim.lr: must be > 0"),
])
def test_lr_find_refusals_are_one_line(store, tmp_path, capsys, extra, expected):
    recipe = _recipe(tmp_path, store)
    assert main(["lr-find", str(recipe), "--out", str(tmp_path / "lf"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcifar: error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "lf").exists()


def test_lr_find_never_writes_into_a_folder_it_did_not_make(store, tmp_path, capsys):
    recipe = _recipe(tmp_path, store)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    assert main(["lr-find", str(recipe), "--out", str(mine)]) == 2
    assert "holds files fastcifar did not write" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
