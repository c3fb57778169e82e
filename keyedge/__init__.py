"""keyedge: deploy key-based adversarially defended image classifiers on devices.

Each deployed model gets its own secret key; images are block-wise shuffled by
the key before the network sees them (see ``keyedge.keys.transform``).  Importing
this package is cheap: the subpackages (``keyedge.keys``, ``keyedge.models``,
``keyedge.defenses``, ``keyedge.deploy``...; map in docs/architecture.md) load torch
only when needed.
"""

from keyedge.errors import KeyedgeError

__version__ = "0.1.0"
__all__ = ["KeyedgeError", "__version__"]
