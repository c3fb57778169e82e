"""`keyedge train` / `keyedge eval` on real data (Fashion-MNIST subsets) with tiny timm models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from keyedge.attacks.gradients import mean_gradient_similarity
from keyedge.checkpoints import load_checkpoint, read_manifest
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN, load_dataset
from keyedge.training.loop import TrainConfig, evaluate, train, warmup_cosine

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
runner = CliRunner()
TINY = dict(
    model="test_efficientnet",
    data="fashion-mnist",
    weights="none",
    image_size=32,
    epochs=2,
    batch_size=32,
    train_limit=128,
    test_limit=64,
)


def _config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **overrides})


def _quiet(_line: str) -> None:
    pass


def test_schedule_warms_up_then_decays():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_train_keyed_full_checkpoints_every_epoch_and_reloads(tmp_path, key4):
    key_path = key4.save(tmp_path / "k.bin")
    manifest = train(_config(tmp_path, "run", key_file=str(key_path)), progress=False, log=_quiet)
    assert manifest.epoch == 2 and [h["epoch"] for h in manifest.metrics["history"]] == [1, 2]
    assert manifest.fingerprint == key4.fingerprint
    assert manifest.data["train_images"] == 128 and manifest.training["config"]["seed"] == 0
    model, _ = load_checkpoint(tmp_path / "run", key4)
    test_set, _ = load_dataset("fashion-mnist", "test", 32, limit=64, seed=0)
    assert evaluate(model, test_set)["accuracy"] == pytest.approx(manifest.test_accuracy)


def test_resume_continues_exactly_like_a_straight_run(tmp_path, monkeypatch):
    import keyedge.training.loop as train_module

    train(_config(tmp_path, "straight"), progress=False, log=_quiet)
    real_save = train_module.save_checkpoint

    def killed_in_epoch_2(directory, model, *, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt  # the run dies before its second checkpoint
        return real_save(directory, model, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "split"), progress=False, log=_quiet)
    monkeypatch.undo()
    assert read_manifest(tmp_path / "split").epoch == 1
    manifest = train(_config(tmp_path, "split", resume=True), progress=False, log=_quiet)
    assert manifest.epoch == 2 and len(manifest.metrics["history"]) == 2
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "split")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-5), name


def test_train_lora_stores_only_adapters(tmp_path, key4):
    key_path = key4.save(tmp_path / "k.bin")
    base = Path(_base_weights(tmp_path))
    manifest = train(
        _config(tmp_path, "lora", key_file=str(key_path), finetune="lora", weights=str(base), epochs=1),
        progress=False,
        log=_quiet,
    )
    assert manifest.finetune_mode == "lora" and manifest.finetune["lora"]["r"] == 8
    weights = tmp_path / "lora" / manifest.files["weights"].file
    assert weights.stat().st_size < base.stat().st_size
    model, _ = load_checkpoint(tmp_path / "lora", key4)
    assert model.keyed
    # the recipe that trained it is recorded: the family's default, first layer trained fully, its learning rate
    recipe = manifest.finetune["lora"]
    assert recipe["full"] == ["conv_stem", "bn1"] and recipe["lr"] == manifest.training["learning_rate"] == 1e-2
    assert manifest.recipe.startswith("LoRA r8/a8 on conv_pw+conv_pwl, full conv_stem+bn1, lr 0.01, 1 epoch")
    stem = model.backbone.get_base_model().conv_stem.weight
    base_stem = load_file(str(base))["conv_stem.weight"]
    assert not torch.equal(stem, base_stem), "the fully trained stem was saved and loaded, not the base's"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert manifest.training["trainable_parameters"] == trainable


def test_train_lora_without_full_layers_and_a_wrong_layer_name(tmp_path, key4):
    key_path = key4.save(tmp_path / "k.bin")
    base = _base_weights(tmp_path)
    config = _config(tmp_path, "adapters", key_file=str(key_path), finetune="lora", weights=base, epochs=1)
    config.lora_full, config.lora_targets, config.lr = [], ["conv_stem", "conv_pw"], 1e-3
    manifest = train(config, progress=False, log=_quiet)
    assert (
        manifest.finetune["lora"]["full"] == []
        and "no full layers" in manifest.recipe
        and "lr 0.001" in manifest.recipe
    )
    result = CliRunner().invoke(
        app,
        ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", base, "--finetune", "lora",
         "--lora-full", "stem", "--image-size", "32", "--train-limit", "20", "-o", str(tmp_path / "bad")],
    )  # fmt: skip
    assert result.exit_code == 2 and "no layer named 'stem'" in result.stderr, result.output
    assert not (tmp_path / "bad").exists()


def _base_weights(tmp_path: Path) -> str:
    """One shared 'pretrained' backbone, as keyed models of one base share it."""
    from safetensors.torch import save_file

    from keyedge.models.backbones import create_backbone

    torch.manual_seed(123)
    backbone, _ = create_backbone("test_efficientnet", 10, weights="none")
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, path)
    return str(path)


def test_orthogonality_regularizer_lowers_gradient_similarity(tmp_path):
    base_weights = _base_weights(tmp_path)
    train(_config(tmp_path, "ref", seed=1, epochs=1, weights=base_weights), progress=False, log=_quiet)
    common = dict(ortho_ref=str(tmp_path / "ref"), epochs=2, lr=2e-3, weights=base_weights)
    base = train(_config(tmp_path, "lam0", ortho_lambda=0.0, **common), progress=False, log=_quiet)
    ortho = train(_config(tmp_path, "lam10", ortho_lambda=10.0, **common), progress=False, log=_quiet)
    assert "ortho_similarity" in ortho.metrics["history"][-1]
    ref, _ = load_checkpoint(tmp_path / "ref")
    data, _ = load_dataset("fashion-mnist", "test", 32, limit=128, seed=3)
    sims = {
        name: mean_gradient_similarity(load_checkpoint(tmp_path / name)[0], ref, data) for name in ("lam0", "lam10")
    }
    assert sims["lam10"] < sims["lam0"] - 0.05, sims
    assert base.metrics["history"][-1]["ortho_similarity"] > ortho.metrics["history"][-1]["ortho_similarity"]


@pytest.mark.slow
def test_ddp_two_processes_with_gloo(tmp_path):
    """The same command under torchrun: 2 CPU processes, gloo backend, one checkpoint."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "keyedge",
        "train",
        "-m",
        "test_efficientnet",
        "-d",
        "fashion-mnist",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-limit",
        "96",
        "--test-limit",
        "50",
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.training["world_size"] == 2
    assert manifest.metrics["test_images"] == 50, "evaluation must cover each test image exactly once"
    assert proc.stdout.count("epoch 1/1") == 1, "only rank 0 reports"


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    for fragment in fragments:
        assert fragment in line, line


def test_cli_train_eval_and_key_diversity_note(tmp_path, key4, make_key):
    key_path = key4.save(tmp_path / "k.bin")
    other = make_key(4).save(tmp_path / "other.bin")
    args = [
        "train",
        "-m",
        "test_efficientnet",
        "-d",
        "fashion-mnist",
        "--weights",
        "none",
        "--image-size",
        32,
        "--epochs",
        1,
        "--batch-size",
        32,
        "--train-limit",
        64,
        "--test-limit",
        32,
        "-k",
        key_path,
        "-o",
        tmp_path / "run",
    ]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout
    _clean_error(_cli(*args), "already holds a checkpoint", "--resume")
    again = _cli(*args, "--overwrite")  # the one --overwrite: start over
    assert again.exit_code == 0 and "test accuracy" in again.stdout, again.output
    same = _cli("eval", "-c", tmp_path / "run", "-k", key_path, "-d", "fashion-mnist", "--limit", 32, "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["key_matches"] is True
    diff = _cli("eval", "-c", tmp_path / "run", "-k", other, "-d", "fashion-mnist", "--limit", 32, "--json")
    assert diff.exit_code == 0 and json.loads(diff.stdout)["key_matches"] is False
    assert "key-diversity" in diff.stderr
    _clean_error(_cli("eval", "-c", tmp_path / "run", "-d", "fashion-mnist"), "pass its key")


def test_cli_train_bad_inputs(tmp_path, make_key):
    base = ["train", "-d", "fashion-mnist", "--weights", "none", "--epochs", 1, "--train-limit", 16, "--test-limit", 16]
    _clean_error(_cli(*base, "-m", "efficientnet_lite", "-o", tmp_path / "a"), "unknown model", "did you mean")
    _clean_error(
        _cli(
            *base,
            "-m",
            "test_efficientnet",
            "--image-size",
            36,
            "-k",
            make_key(8).save(tmp_path / "k8"),
            "-o",
            tmp_path / "b",
        ),
        "block size 8 does not divide",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _clean_error(
        _cli(
            "train", "-m", "test_efficientnet", "-d", f"imagefolder:{empty}", "--weights", "none", "-o", tmp_path / "c"
        )
    )
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "code": print}, evil)
    _clean_error(_cli(*base, "-m", "test_efficientnet", "--weights", evil, "-o", tmp_path / "d"), "pickled")
    _clean_error(
        _cli(*base, "-m", "test_efficientnet", "--finetune", "half", "-o", tmp_path / "e"), "unknown fine-tune mode"
    )
    assert not any((tmp_path / name).exists() for name in "abcde"), "no half-written checkpoint"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "keyedge.json").write_text("garbage")
    _clean_error(_cli("eval", "-c", tmp_path / "bad", "-d", "fashion-mnist"), "not valid JSON")


def test_transfer_guard_replaces_a_share_of_the_batch_with_examples_that_fool_the_guard_model(tmp_path, make_key):
    from keyedge.training.guard import TransferGuard

    ref_key = make_key(4, tag=9).save(tmp_path / "d1.bin")
    train(_config(tmp_path, "d1", key_file=str(ref_key), epochs=1), progress=False, log=_quiet)
    eps = 16 / 255
    guard = TransferGuard.load([str(tmp_path / "d1")], [str(ref_key)], eps, 3, 0.5, "cpu")
    data, _ = load_dataset("fashion-mnist", "test", 32, limit=32, seed=0)
    x = torch.stack([data[i][0] for i in range(32)])
    y = torch.as_tensor([int(data[i][1]) for i in range(32)])
    out = guard(x, y)
    assert torch.equal(out[16:], x[16:]), "the rest of the batch stays clean"
    moved = (out[:16] - x[:16]).abs()
    assert moved.max() <= eps + 1e-6 and moved.mean() > eps / 4 and out.min() >= 0 and out.max() <= 1
    loss = torch.nn.functional.cross_entropy
    model = guard.models[0]
    with torch.no_grad():
        assert loss(model(out[:16]), y[:16]) > loss(model(x[:16]), y[:16]) + 0.05, "PGD ascends the guard's loss"


def test_train_with_a_transfer_guard_records_it_in_the_recipe_and_refuses_bad_settings(tmp_path, key4, make_key):
    ref_key = make_key(4, tag=9).save(tmp_path / "d1.bin")
    train(_config(tmp_path, "d1", key_file=str(ref_key), epochs=1), progress=False, log=_quiet)
    key_path = key4.save(tmp_path / "k.bin")
    args = ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", "none", "--image-size", 32,
            "--epochs", 1, "--train-limit", 64, "--test-limit", 32, "-k", key_path]  # fmt: skip
    result = _cli(*args, "-o", tmp_path / "guarded", "--guard-model", tmp_path / "d1", "--guard-key", ref_key,
                  "--guard-eps", "8/255", "--guard-steps", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "guarded")
    assert "transfer guard (1 other-key models, eps 8/255, 2 PGD steps, 50% of each batch)" in manifest.recipe
    assert manifest.training["config"]["guard_eps"] == pytest.approx(8 / 255)
    _clean_error(_cli(*args, "-o", tmp_path / "a", "--guard-model", tmp_path / "d1"), "no key with fingerprint")
    _clean_error(_cli(*args, "-o", tmp_path / "b", "--guard-key", ref_key), "--guard-key needs --guard-model")
    guard = ["--guard-model", tmp_path / "d1"]
    _clean_error(_cli(*args, "-o", tmp_path / "c", *guard, "--guard-eps", "x"), "--guard-eps")
    _clean_error(_cli(*args, "-o", tmp_path / "e", *guard, "--guard-share", 0), "--guard-share")
    own = ["--guard-model", tmp_path / "guarded", "--guard-key", key_path]
    _clean_error(_cli(*args, "-o", tmp_path / "f", *own), "has the key of the model being trained")
    # issue 33: a guard model of another input size (or class count) was a traceback mid-epoch
    at_64 = [a if a != 32 else 64 for a in args]
    _clean_error(_cli(*at_64, "-o", tmp_path / "g", *guard, "--guard-key", ref_key), "takes 32px images into 10")
    # issue 33: LoRA's options on a full fine-tune were silently ignored; a seed past 32 bits was a traceback
    _clean_error(_cli(*args, "-o", tmp_path / "h", "--lora-full", "conv_stem"), "only apply to --finetune lora")
    _clean_error(_cli(*args, "-o", tmp_path / "i", "--seed", 2**64), "--seed")
    assert not any((tmp_path / name).exists() for name in "abcefghi"), "no half-written checkpoint"


def test_a_resumed_guarded_run_crafts_and_learns_what_a_straight_one_does(tmp_path, make_key, monkeypatch):
    import keyedge.training.loop as train_module

    ref_key = make_key(4, tag=9).save(tmp_path / "d1.bin")
    train(_config(tmp_path, "d1", key_file=str(ref_key), epochs=1), progress=False, log=_quiet)
    guard = dict(guard_models=[str(tmp_path / "d1")], guard_keys=[str(ref_key)], guard_steps=2)
    train(_config(tmp_path, "straight", **guard), progress=False, log=_quiet)
    real_save = train_module.save_checkpoint

    def killed_in_epoch_2(directory, model, *, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_save(directory, model, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "split", **guard), progress=False, log=_quiet)
    monkeypatch.undo()
    train(_config(tmp_path, "split", resume=True, **guard), progress=False, log=_quiet)
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "split")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-5), name
