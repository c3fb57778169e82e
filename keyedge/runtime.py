"""The device-side name of :mod:`keyedge.deploy.runtime`: opening deployed artifact sets, sealed or plain.

from keyedge.runtime import open_artifact, open_sealed
model = open_sealed("artifacts/resnet18-0a1b2c3d4e5f6a7b", "device.seal")
model = open_artifact("artifacts/k1-set", "onnx", guard_state="/var/lib/camera/guard.npz")  # a guarded posture
"""

from keyedge.deploy.runtime import (
    IN_MEMORY,
    artifact_target,
    enforce_posture,
    open_artifact,
    open_sealed,
    unseal_target,
)

__all__ = ["IN_MEMORY", "artifact_target", "enforce_posture", "open_artifact", "open_sealed", "unseal_target"]
