"""The volumization defense (volumization-localized-attacks): patches ranked into a volume, a 3D backbone.

The model itself lives in :mod:`keyedge.volumetric` (the 3D counterparts of timm CNNs)
and :mod:`keyedge.volumize` (the volumizer); this module is how the rest of keyedge
meets it: rebuilt from a checkpoint's ``defense`` record, exported in raster order (with
1-deep kernels the ranking cannot change the output), reported under the role ``volumize``.
A volumized model takes no key and is fully fine-tuned.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from keyedge.defenses import Defense, Deployable, register_defense
from keyedge.errors import KeyedgeError


@register_defense
class VolumizeDefense(Defense):
    name = "volumize"
    takes_key = False
    finetune_modes = ("full",)

    def build(self, backbone: nn.Module, spec: Any, record: dict[str, Any] | None, key: Any) -> nn.Module:
        from keyedge.volumetric import model_from_defense

        if key is not None:
            raise KeyedgeError("a volumized model takes no key", "drop --key-file")
        return model_from_defense(backbone, spec, record or {})

    def record(self, model: nn.Module) -> dict[str, Any] | None:
        return model.defense()

    def check_record(self, record: dict[str, Any] | None, source: str) -> None:
        from keyedge.volumize import VolumizeConfig

        try:
            VolumizeConfig.from_dict(record or {})
        except (KeyError, TypeError, ValueError, KeyedgeError) as exc:
            text = exc.message if isinstance(exc, KeyedgeError) else repr(exc)
            raise KeyedgeError(
                f"{source}: field 'defense' is not a valid volumize record ({text})",
                "the checkpoint is corrupted or was hand-edited",
            ) from None

    def deployable(self, model: nn.Module, key: Any, fuse: str = "gather") -> Deployable:
        from keyedge.volumetric import RasterVolumizedModel

        return Deployable(
            RasterVolumizedModel(model.eval()).eval(),
            "none",
            "volumized: patches in raster order (with 1-deep kernels the ranking cannot change the "
            "output, so it is not in the graph)",
        )

    def role(self, fingerprint: str | None) -> str:
        return "volumize"

    def artifact_name(self, model_name: str, fingerprint: str | None) -> str:
        return f"{model_name}-volumized"
