"""The device-side name of :mod:`keyedge.deploy.runtime`: opening deployed artifact sets, sealed or plain.

from keyedge.runtime import open_sealed
model = open_sealed("artifacts/resnet18-0a1b2c3d4e5f6a7b", "device.seal")
"""

from keyedge.deploy.runtime import artifact_target, open_artifact, open_sealed, unseal_target

__all__ = ["artifact_target", "open_artifact", "open_sealed", "unseal_target"]
