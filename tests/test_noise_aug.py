"""`keyedge train --noise-aug SIGMA`: noise-augmented fine-tuning for noise postures (issue 32, item 2).

Tiny timm model and Fashion-MNIST subsets, as tests/test_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from typer.testing import CliRunner

import keyedge.training.loop as loop
from keyedge.checkpoints import load_checkpoint, read_manifest
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.errors import KeyedgeError
from keyedge.training.loop import TrainConfig, train

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
TINY = dict(
    model="test_efficientnet",
    data="fashion-mnist",
    weights="none",
    image_size=32,
    epochs=1,
    batch_size=16,
    train_limit=32,
    test_limit=16,
)


def _config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **overrides})


def _quiet(_line: str) -> None:
    pass


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / read_manifest(directory).files["weights"].file))


def test_the_recipe_records_the_noise_full_and_lora():
    full = TrainConfig(model="m", data="d", out="o", noise_aug=0.05).recipe("efficientnet")
    assert full["noise_aug"] == 0.05 and full["recipe"].endswith(", noise aug 0.05")
    lora = TrainConfig(model="m", data="d", out="o", finetune="lora", noise_aug=8 / 255).recipe("efficientnet")
    assert lora["mode"] == "lora" and lora["noise_aug"] == 8 / 255
    assert lora["recipe"].startswith("LoRA r8/a8") and lora["recipe"].endswith(", noise aug 0.0313725")
    clean = TrainConfig(model="m", data="d", out="o").recipe("efficientnet")
    assert "noise_aug" not in clean and "noise" not in clean["recipe"]  # as before the option existed


class _Gray(Dataset):
    """The real labels on uniform gray images: whatever the model sees beyond 0.5 is the added noise."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return torch.full_like(x, 0.5), y


def test_noise_reaches_the_model_in_training_and_in_the_noisy_evaluation_only(tmp_path, key4, monkeypatch):
    real_load, real_prepare = loop.load_dataset, loop.prepare_model
    seen: list[tuple[bool, torch.Tensor]] = []

    def gray(*args, **kwargs):
        dataset, info = real_load(*args, **kwargs)
        return _Gray(dataset), info

    def watched(*args, **kwargs):  # what enters the keyed model, before its shuffle
        model = real_prepare(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].detach())))
        return model

    monkeypatch.setattr(loop, "load_dataset", gray)
    monkeypatch.setattr(loop, "prepare_model", watched)
    sigma = 0.2
    manifest = train(
        _config(tmp_path, "noisy", key_file=str(key4.save(tmp_path / "k.bin")), noise_aug=sigma),
        progress=False,
        log=_quiet,
    )
    trained = torch.cat([x for training, x in seen if training]) - 0.5
    assert trained.numel() == 32 * 3 * 32 * 32
    assert trained.std().item() == pytest.approx(sigma, rel=0.02) and abs(trained.mean().item()) < 0.005
    assert (trained + 0.5).min() < 0 and (trained + 0.5).max() > 1  # unclamped, as the posture's noise
    clean, noisy = [x - 0.5 for training, x in seen if not training]  # one clean, one noisy evaluation
    assert torch.equal(clean, torch.zeros_like(clean))
    assert noisy.std().item() == pytest.approx(sigma, rel=0.05)
    # recorded: the recipe, the finetune record as read back, the epoch's accuracy under the same noise
    assert manifest.noise_aug == sigma and manifest.finetune["noise_aug"] == sigma
    assert manifest.recipe.endswith(", noise aug 0.2")
    last = manifest.metrics["history"][-1]
    assert (
        0 <= last["noisy_test_accuracy"] <= 1 and manifest.metrics["noisy_test_accuracy"] == last["noisy_test_accuracy"]
    )
    model, _ = load_checkpoint(tmp_path / "noisy", key4)
    assert model.keyed


def test_sigma_zero_draws_nothing_and_records_nothing(tmp_path, monkeypatch):
    def no_noise(*args, **kwargs):
        raise AssertionError("noise drawn with --noise-aug 0")

    monkeypatch.setattr(loop, "add_noise", no_noise)
    lines: list[str] = []
    manifest = train(_config(tmp_path, "clean", noise_aug=0.0), progress=False, log=lines.append)
    assert manifest.noise_aug == 0.0 and "noise_aug" not in manifest.finetune and "noise" not in manifest.recipe
    assert "noisy_test_accuracy" not in manifest.metrics["history"][-1] and "noise" not in lines[-1]


def test_a_noisy_run_resumes_exactly_and_refuses_another_sigma(tmp_path, monkeypatch):
    noisy = dict(epochs=2, noise_aug=0.1)
    train(_config(tmp_path, "straight", **noisy), progress=False, log=_quiet)
    real_save = loop.save_checkpoint

    def killed_in_epoch_2(directory, model, *, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_save(directory, model, epoch=epoch, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "split", **noisy), progress=False, log=_quiet)
    monkeypatch.undo()
    with pytest.raises(KeyedgeError, match=r"noise_aug=0\.1, not 0\.2"):
        train(_config(tmp_path, "split", resume=True, **{**noisy, "noise_aug": 0.2}), progress=False, log=_quiet)
    train(_config(tmp_path, "split", resume=True, **noisy), progress=False, log=_quiet)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the noise is seeded per epoch"


def test_lora_trains_with_noise(tmp_path, key4):
    from safetensors.torch import save_file

    from keyedge.models.backbones import create_backbone

    torch.manual_seed(123)
    backbone, _ = create_backbone("test_efficientnet", 10, weights="none")
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, base)
    config = _config(
        tmp_path, "lora", key_file=str(key4.save(tmp_path / "k.bin")), finetune="lora", weights=str(base), noise_aug=0.1
    )
    manifest = train(config, progress=False, log=_quiet)
    assert manifest.finetune_mode == "lora" and manifest.finetune["lora"]["r"] == 8 and manifest.noise_aug == 0.1
    assert manifest.recipe.startswith("LoRA r8/a8") and manifest.recipe.endswith(", noise aug 0.1")
    assert "noisy_test_accuracy" in manifest.metrics["history"][-1]
    assert load_checkpoint(tmp_path / "lora", key4)[0].keyed


@pytest.mark.parametrize("sigma", ["-0.1", "0.6", "nan", "inf", "1/0", "lots"])
def test_cli_refuses_a_bad_sigma_in_one_line_before_anything(tmp_path, sigma):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", "none", "--image-size", "32",
         "--train-limit", "20", "--noise-aug", sigma, "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --noise-aug"), result.stderr
    assert not out.exists() and result.stdout == ""
