"""train.amp = "auto": on the CPU the faster of fp32 and bf16 for the model on this machine, measured once, cached,
recorded in result.json and shown by `fastcifar bench --precision auto`; true / false keep their meaning."""

from __future__ import annotations

import json

import pytest
import torch

import fastcifar.precision as precision
from fastcifar.cli import main
from fastcifar.models import create_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def _fake(monkeypatch, rates: dict[str, float]) -> list[int]:
    calls = []
    monkeypatch.setattr(precision, "measure", lambda model, batch, *a, **k: calls.append(batch) or dict(rates))
    return calls


def test_the_faster_precision_is_chosen_once_then_read_from_the_cache(cache, monkeypatch):
    model = create_model("cnn_bn", width=4)
    calls = _fake(monkeypatch, {"fp32": 100.0, "bf16": 180.0})
    lines = []
    first = precision.choose_cpu_precision(model, {"name": "cnn_bn", "width": 4}, 512, 32, 10, True, log=lines.append)
    assert (first.precision, first.chosen_by, first.dtype, calls) == ("bf16", "probe", torch.bfloat16, [128])
    again = precision.choose_cpu_precision(model, {"name": "cnn_bn", "width": 4}, 512, 32, 10, True)
    assert (again.precision, again.chosen_by, again.img_per_s, calls) == ("bf16", "cache", first.img_per_s, [128])
    assert "bf16" in lines[0] and "fp32 100 img/s, bf16 180 img/s at batch 128; measured now" in lines[0]
    # another model is measured on its own; bf16 within 5 % of fp32 keeps the exact one
    _fake(monkeypatch, {"fp32": 100.0, "bf16": 104.0})
    other = precision.choose_cpu_precision(model, {"name": "cnn_bn", "width": 8}, 64, 32, 10, True)
    assert (other.precision, other.chosen_by, other.probe_batch) == ("fp32", "probe", 64)
    assert len(json.loads(cache.read_text())["entries"]) == 2
    forced = precision.choose_cpu_precision(model, {"name": "x"}, 64, 32, 10, True, forced_bf16=True)
    assert (forced.precision, forced.chosen_by) == ("bf16", "train.amp_cpu")


@pytest.mark.parametrize("content", ["not json", '{"version": 1, "entries": {"k": {"fp32": -1}}}', "[]"])
def test_a_broken_cache_is_measured_again_and_rewritten(cache, monkeypatch, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    calls = _fake(monkeypatch, {"fp32": 50.0, "bf16": 20.0})
    choice = precision.choose_cpu_precision(create_model("cnn_bn", width=4), {"name": "k"}, 16, 32, 10, True)
    assert (choice.precision, choice.chosen_by, calls) == ("fp32", "probe", [16])
    assert json.loads(cache.read_text())["version"] == precision.CACHE_VERSION


def test_the_probe_leaves_the_model_and_the_generators_as_they_were():
    torch.manual_seed(3)
    model = create_model("cnn_bn", width=4, dropout=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rates = precision.measure(model, 8, 32, 10, channels_last=True, steps=1)
    assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _train(store, out, amp: str, *extra: str) -> dict:
    sets = [f'data.store="{store}"', "model.width=4", "train.epochs=1", "train.batch_size=32", "eval.batch_size=80",
            "eval.figures=false", f"train.amp={amp}", *extra]
    assert main(["train", "quickstart", "--device", "cpu", "--out", str(out)]
                + [a for s in sets for a in ("--set", s)]) == 0
    return json.loads((out / "result.json").read_text())["engine"]["precision"]


def test_train_amp_auto_records_the_choice_and_true_false_keep_their_meaning(store, tmp_path, cache, monkeypatch,
                                                                               capsys):
    calls = _fake(monkeypatch, {"fp32": 40.0, "bf16": 90.0})
    got = _train(store, tmp_path / "auto", '"auto"')
    assert (got["precision"], got["chosen_by"], got["img_per_s"]) == ("bf16", "probe", {"fp32": 40.0, "bf16": 90.0})
    assert "train.amp = auto: cnn_bn on this CPU in bf16" in capsys.readouterr().out
    assert _train(store, tmp_path / "auto2", '"auto"')["chosen_by"] == "cache" and len(calls) == 1
    assert _train(store, tmp_path / "true", "true") == {"precision": "fp32", "chosen_by": "recipe"}  # as before
    assert _train(store, tmp_path / "false", "false") == {"precision": "fp32", "chosen_by": "recipe"}
    assert _train(store, tmp_path / "cpu", "true", "train.amp_cpu=true") == {"precision": "bf16",
                                                                              "chosen_by": "recipe"}
    assert len(calls) == 1


def test_bench_shows_the_auto_choice(store, tmp_path, cache, monkeypatch, capsys):
    _fake(monkeypatch, {"fp32": 300.0, "bf16": 120.0})
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(store), "--model", "cnn_bn", "--batch", "16", "--serve-batch", "8",
                 "--precision", "auto", "--json", str(out), "--device", "cpu", "--seconds", "0.1", "--warmup", "1",
                 "--workers", "1"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["precision"] == "auto" and row["auto"]["precision"] == "fp32" and row["train_img_s"] > 0
    text = capsys.readouterr().out
    assert "auto->fp32" in text and 'precision auto (cnn_bn b16): fp32, train.amp = "auto" on this CPU' in text
