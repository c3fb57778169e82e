"""Checkpoints: round trips (full and LoRA), key fingerprint checks, corruption, atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch

import keyedge.checkpoints as ckpt
from keyedge.checkpoints import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from keyedge.models.backbones import build_model
from keyedge.models.lora import apply_lora, lora_settings

INFO = dict(
    finetune={"mode": "full", "lora": None},
    data={"name": "test"},
    training={"config": {}},
    metrics={"test_accuracy": 0.5},
)


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture
def full_model(key4):
    model = build_model("test_efficientnet", 10, key=key4, weights="none", image_size=32)
    _perturb(model)
    return model


def _same_outputs(a, b):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


def test_full_round_trip_and_manifest(tmp_path, full_model, key4):
    save_checkpoint(tmp_path / "run", full_model, epoch=1, **INFO)
    loaded, manifest = load_checkpoint(tmp_path / "run", key4)
    assert _same_outputs(full_model, loaded) == 0.0
    assert manifest.to_dict()["key"] == {"fingerprint": key4.fingerprint, "block_size": 4}
    text = (tmp_path / "run" / "keyedge.json").read_text()
    assert key4.fingerprint in text
    assert json.dumps(key4.permutation.tolist()) not in text and bytes(range(32)).hex() not in text
    assert manifest.model.name == "test_efficientnet" and manifest.versions["torch"]


def test_lora_round_trip_is_small_and_exact(tmp_path, key4):
    from safetensors.torch import save_file

    base = build_model("test_efficientnet", 10, weights="none", image_size=32).backbone
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    model = build_model("test_efficientnet", 10, key=key4, weights=str(tmp_path / "base.safetensors"), image_size=32)
    settings = lora_settings("efficientnet")
    apply_lora(model, settings)
    _perturb(model)
    model.train()
    model(torch.rand(8, 3, 32, 32))  # move BN running statistics: they must be saved too
    save_checkpoint(
        tmp_path / "lora", model, epoch=1, **{**INFO, "finetune": {"mode": "lora", "lora": settings.to_dict()}}
    )
    loaded, _manifest = load_checkpoint(tmp_path / "lora", key4)
    assert _same_outputs(model, loaded) <= 1e-6
    weights = next((tmp_path / "lora").glob("weights-*.safetensors"))
    assert weights.stat().st_size < (tmp_path / "base.safetensors").stat().st_size / 2


def test_key_mismatch_refused_unless_deliberate(tmp_path, full_model, key4, make_key):
    save_checkpoint(tmp_path / "run", full_model, epoch=1, **INFO)
    other = make_key(4)
    with pytest.raises(CheckpointError, match="differs from the key the model was trained with"):
        load_checkpoint(tmp_path / "run", other)
    with pytest.raises(CheckpointError, match="pass its key"):
        load_checkpoint(tmp_path / "run", None)
    model, _ = load_checkpoint(tmp_path / "run", other, allow_key_mismatch=True)
    assert model.key_fingerprint == other.fingerprint


def test_corrupted_checkpoints(tmp_path, full_model, key4):
    run = tmp_path / "run"
    save_checkpoint(run, full_model, epoch=1, **INFO)
    weights = next(run.glob("weights-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its manifest checksum"):
        load_checkpoint(run, key4)
    (run / "keyedge.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(run)
    (run / "keyedge.json").write_text(json.dumps({"format": "keyedge-checkpoint", "version": 99}))
    with pytest.raises(CheckpointError, match="upgrade keyedge"):
        read_manifest(run)
    with pytest.raises(CheckpointError, match="not found"):
        read_manifest(tmp_path / "nothing")


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, full_model, key4, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, full_model, epoch=1, **INFO)
    before = _same_outputs(full_model, load_checkpoint(run, key4)[0])
    _perturb(full_model)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing weights and switching the manifest

    monkeypatch.setattr(ckpt, "write_bytes_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, full_model, epoch=2, **INFO)
    monkeypatch.undo()
    _loaded, manifest = load_checkpoint(run, key4)
    assert manifest.epoch == 1 and before == 0.0
    save_checkpoint(run, full_model, epoch=3, **INFO)  # the next save cleans up the orphan
    assert len(list(run.glob("weights-*"))) == 1
