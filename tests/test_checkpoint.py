"""Checkpoint directories: round trip (weights, config, processor, tied weights), atomicity, errors."""

from __future__ import annotations

import json

import pytest
import torch

import visto
from test_train_fixture import TinyConfig, TinyModel, TinyProcessor, tiny_family  # noqa: F401
from visto.checkpoint import load, load_trainer_state, save_checkpoint
from visto.errors import UserError

pytestmark = pytest.mark.usefixtures("tiny_family")


def _model(seed: int = 0, **cfg) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(TinyConfig(**cfg))


def test_round_trip_weights_config_processor_and_tied_weights(tmp_path):
    model = _model(hidden=6, dropout=0.0)
    model.processor = TinyProcessor(scale=0.5)
    path = save_checkpoint(model, tmp_path / "ckpt", card={"metrics": {"acc": 0.75}},
                           trainer_state={"step": 7})
    meta = json.loads((path / "config.json").read_text())
    assert meta["family"] == "tiny" and meta["config"] == {"hidden": 6, "num_classes": 3, "dropout": 0.0}
    assert meta["visto_version"] == visto.__version__
    card = (path / "README.md").read_text()
    assert "tiny" in card and "| acc | 0.75 |" in card

    loaded = visto.load(path)  # the lazy top-level alias
    assert isinstance(loaded, TinyModel) and not loaded.training
    assert loaded.config == model.config
    assert loaded.processor.scale == 0.5
    assert loaded.head.weight is loaded.embed.weight  # still tied, not two copies
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load_trainer_state(path) == {"step": 7}


def test_tied_weight_is_stored_once(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(_model(), tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"head.weight", "embed.weight"}) == 1


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = save_checkpoint(_model(seed=1), tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    class BrokenProcessor(TinyProcessor):
        def save(self, directory):
            (directory / "half-written.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(seed=2), path, processor=BrokenProcessor())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp directories left behind
    assert torch.equal(load(path).stem.weight, _model(seed=1).stem.weight)


def test_clear_errors_for_missing_corrupt_and_unknown(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        load(tmp_path / "nope")
    path = save_checkpoint(_model(), tmp_path / "ckpt")

    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load(path)

    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load(path)

    (path / "config.json").write_text(json.dumps({"family": "nosuch", "config": {}}))
    with pytest.raises(UserError, match="unknown model family 'nosuch'.*tiny"):
        load(path)

    (path / "config.json").write_text(json.dumps({"family": "tiny", "config": {"hiden": 3}}))
    with pytest.raises(UserError, match="unknown setting"):
        load(path)

    with pytest.raises(UserError, match="not a resumable"):
        load_trainer_state(save_checkpoint(_model(), tmp_path / "plain"))


def test_weights_that_do_not_fit_the_config_are_a_user_error(tmp_path):
    path = save_checkpoint(_model(hidden=8), tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["hidden"] = 5
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match"):
        load(path)


def test_processor_outside_visto_is_not_imported(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["processor"] = "some_untrusted_module_xyz:Proc"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="outside visto"):
        load(path)


def test_import_visto_stays_light():
    import subprocess
    import sys

    code = "import sys, visto; assert 'torch' not in sys.modules; print(callable(visto.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
