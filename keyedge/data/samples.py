"""Sample photos shipped by installed packages, for demos and real-input checks offline.

scikit-image ships a few public-domain photos inside its wheel (docs/design.md §5);
the ``samples`` extra installs it.  ``python -m keyedge.data.samples NAME OUT.png``
writes one to a file.
"""

from __future__ import annotations

import sys

import numpy as np

from keyedge.data.images import write_image
from keyedge.deps import require
from keyedge.errors import KeyedgeError

#: scikit-image photos that ship in its wheel (no download), RGB, with their size.
PHOTOS = {"astronaut": (512, 512), "chelsea": (300, 451), "coffee": (400, 600), "rocket": (427, 640)}


def sample_photo(name: str = "astronaut") -> np.ndarray:
    """An (H, W, 3) uint8 photo from scikit-image's bundled data."""
    if name not in PHOTOS:
        raise KeyedgeError(f"unknown sample photo {name!r}", f"choose one of {', '.join(PHOTOS)}")
    data = require("skimage.data", extra="samples")
    return np.asarray(getattr(data, name)())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m keyedge.data.samples NAME OUT.png", file=sys.stderr)
        return 2
    try:
        write_image(args[1], sample_photo(args[0]), overwrite=True)
    except KeyedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
