"""The volumization defense (volumization-localized-attacks): patches ranked into a volume, a 3D backbone.

The model itself lives in :mod:`keyedge.defenses.volumetric` (the 3D counterparts of timm CNNs)
and :mod:`keyedge.defenses.volumizer` (the volumizer); this module is how the rest of keyedge
meets it: rebuilt from a checkpoint's ``defense`` record, exported in raster order (with
1-deep kernels the ranking cannot change the output), reported under the role ``volumize``.
A volumized model takes no key and is fully fine-tuned.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from keyedge.defenses import Defense, Deployable, register_defense
from keyedge.defenses.volumetric import (
    RasterVolumizedModel,
    aggregate,
    build_volumized_model,
    check_depth_kernel,
    model_from_defense,
    patch_aggregate_loss,
)
from keyedge.defenses.volumizer import VolumizeConfig, check_patch
from keyedge.errors import KeyedgeError


@register_defense
class VolumizeDefense(Defense):
    name = "volumize"
    takes_key = False
    finetune_modes = ("full",)

    def build(self, backbone: nn.Module, spec: Any, record: dict[str, Any] | None, key: Any) -> nn.Module:
        if key is not None:
            raise KeyedgeError("a volumized model takes no key", "drop --key-file")
        return model_from_defense(backbone, spec, record or {})

    def record(self, model: nn.Module) -> dict[str, Any] | None:
        return model.defense()

    def check_record(self, record: dict[str, Any] | None, source: str) -> None:
        try:
            VolumizeConfig.from_dict(record or {})
        except (KeyError, TypeError, ValueError, KeyedgeError) as exc:
            text = exc.message if isinstance(exc, KeyedgeError) else repr(exc)
            raise KeyedgeError(
                f"{source}: field 'defense' is not a valid volumize record ({text})",
                "the checkpoint is corrupted or was hand-edited",
            ) from None

    def deployable(self, model: nn.Module, key: Any, fuse: str = "gather") -> Deployable:
        return Deployable(
            RasterVolumizedModel(model.eval()).eval(),
            "none",
            "volumized: patches in raster order (with 1-deep kernels the ranking cannot change the "
            "output, so it is not in the graph)",
        )

    def role(self, fingerprint: str | None) -> str:
        return "volumize"

    training_fields: ClassVar[dict[str, Any]] = {
        "patch": 16,
        "volume_metric": "entropy",
        "volume_order": "ascending",
        "depth_kernel": 1,
    }

    @staticmethod
    def _config(config: Any) -> Any:
        return VolumizeConfig((config.patch, config.patch), config.volume_metric, config.volume_order)

    def check_training(self, config: Any, image_size: int | None = None) -> None:
        if config.key_file:
            raise KeyedgeError(
                "a volumized model takes no key", "drop --key-file, or use --defense none for a keyed model"
            )
        if config.finetune != "full":
            raise KeyedgeError("--defense volumize trains the whole 3D model", "use --finetune full")
        self._config(config)
        check_depth_kernel(config.depth_kernel)
        if image_size is not None:
            check_patch(image_size, image_size, config.patch)

    def new_model(self, config: Any, key: Any, num_classes: int) -> nn.Module:
        return build_volumized_model(
            config.model,
            num_classes,
            self._config(config),
            depth_kernel=config.depth_kernel,
            weights=config.weights,
            image_size=config.image_size,
        )

    def training_note(self, config: Any, key: Any) -> str:
        return (
            f"volumized ({config.patch}x{config.patch} patches by {config.volume_metric}, {config.volume_order}, "
            f"depth kernel {config.depth_kernel}, curriculum {config.curriculum})"
        )

    def logits_and_loss(self, model: nn.Module, x: Any, y: Any, config: Any) -> tuple[Any, Any]:
        """The aggregated logits, and the patch-aggregate loss on the per-patch logits (volumization paper)."""

        patches = model(x, per_patch=True)  # through the (DDP) wrapper's forward, not .patch_logits
        how = getattr(model, "module", model).aggregation
        return aggregate(patches, how), patch_aggregate_loss(patches, y, config.label_smoothing)

    def artifact_name(self, model_name: str, fingerprint: str | None) -> str:
        return f"{model_name}-volumized"
