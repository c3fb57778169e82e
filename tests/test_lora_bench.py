"""The LoRA benchmarks end to end, on a tiny timm model standing in for a family's (real training, real PGD)."""

from __future__ import annotations

import json

import pytest

from keyedge.benchmarks.experiments import lora, lora_robustness
from keyedge.checkpoints import read_manifest
from keyedge.data.datasets import FASHION_MNIST_DEBIAN

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
TINY_BUDGET = ["--train-limit", "64", "--epochs", "1", "--pretrain-images", "64", "--pretrain-epochs", "1"]


@pytest.fixture
def tiny_family(monkeypatch):
    """'efficientnet' runs timm's test_efficientnet at 32 px, its base pretrained here (no weights to download)."""
    monkeypatch.setitem(lora.FAMILIES, "efficientnet", ("test_efficientnet", 32, None))


def test_lora_robustness_scores_every_arm_against_every_keyless_attack(tmp_path, tiny_family):
    work = tmp_path / "work"
    args = ["--family", "efficientnet", "--arms", "full,lora-guard", "--n", "24", "--steps", "2",
            "--work", str(work), "--json", str(tmp_path / "r.json"), *TINY_BUDGET]  # fmt: skip
    results = {r.arm: r for r in lora_robustness.main(args)}
    assert set(results) == {"full", "lora-guard"}
    for r in results.values():
        f = r.figures
        keyless = [f[k] for k in ("non-adaptive", "adaptive", "multi-key-eot", "adaptive-worst", "eot-worst")]
        assert f["worst-case"] == min(keyless), "the worst case is the minimum over every keyless attack"
        assert f["adaptive-worst"] <= f["adaptive"] and f["eot-worst"] <= f["multi-key-eot"]
        assert f["white-box"] <= f["clean"] and r.images == 24
    assert results["lora-guard"].trainable < results["full"].trainable
    assert "transfer guard (2 other-key models" in results["lora-guard"].recipe
    # the attacker's surrogates are its own: other keys than the target's and the guard's
    runs = work / "runs" / "efficientnet"
    guard_cfg = json.loads((runs / "lora-default-lora-guard-A1-keyed" / "keyedge.json").read_text())
    assert all("-E" in m for m in guard_cfg["training"]["config"]["guard_models"])
    target_cfg = json.loads((runs / "lora-default-lora-guard-T-keyed" / "keyedge.json").read_text())
    assert all("-D" in m for m in target_cfg["training"]["config"]["guard_models"])
    fingerprints = {read_manifest(p.parent).fingerprint for p in runs.glob("*-keyed/keyedge.json")}
    assert len(fingerprints) == 1 + 3 + 2 + 2, "T, A1..A3, D1, D2, E1, E2: one key each"
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["arm"] for r in report["results"]} == set(results) and "se" in report["results"][0]
    # a second run reuses every trained model (the cache): nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/keyedge.json")}
    budget = lora.Budget(train_limit=64, test_limit=24, epochs=1, pretrain_images=64, pretrain_epochs=1)
    weights = lora._base_weights("efficientnet", budget, work, "here", print)
    arms = [lora_robustness.ARMS[a] for a in ("full", "lora-guard")]
    lora_robustness.train_arms("efficientnet", arms, budget, work, weights, print)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/keyedge.json")} == stamps


def test_lora_recipe_grid_table_and_unknown_names(tmp_path, tiny_family, capsys):
    args = ["--families", "efficientnet", "--variants", "full,lora-default", "--no-plain", "--work",
            str(tmp_path), "--json", str(tmp_path / "g.json"), *TINY_BUDGET, "--test-limit", "32"]  # fmt: skip
    result = lora.main(args)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora-default"} and all(r["keyed"] for r in rows.values())
    assert rows["lora-default"]["recipe"].startswith("LoRA r8/a8 on conv_pw+conv_pwl, full conv_stem+bn1")
    assert rows["full"]["speed_vs_full"] == pytest.approx(1.0) and rows["lora-default"]["images_per_s"] > 0
    assert "| efficientnet | lora-default |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lora.main(["--variants", "nope"])
    with pytest.raises(SystemExit):
        lora_robustness.main(["--arms", "nope"])
