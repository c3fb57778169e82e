"""Reading and writing image files for the CLI (Pillow), with keyedge's errors.

Images are handled as (H, W, 3) uint8 arrays: grayscale and palette images are
expanded to RGB and alpha is dropped, as the transform is defined on 3 channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keyedge.errors import ImageError, OutputError
from keyedge.fileio import atomic_output

#: Formats that keep every pixel value, so a shuffled image can be un-shuffled exactly.
LOSSLESS_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".tga"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Load an image file as an (H, W, 3) uint8 array."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} not found", "check the path")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image", "give the path of an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError(
            f"{path} is not an image file Pillow can read", "give a PNG, JPEG, BMP or TIFF image"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or broken image data
        raise ImageError(f"cannot read image {path}: {exc}", "the file may be damaged") from None


def check_image_suffix(path: str | os.PathLike) -> None:
    """Refuse output names whose format Pillow cannot write (before any work is done)."""
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    if suffix not in Image.registered_extensions() or Image.registered_extensions()[suffix] not in Image.SAVE:
        raise ImageError(
            f"cannot tell an image format from the output name {Path(path).name!r}", "end it with .png (lossless)"
        )


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = False) -> Path:
    """Save an (H, W, 3) uint8 array atomically; the format follows the file suffix."""
    from PIL import Image

    check_image_suffix(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            Image.fromarray(np.ascontiguousarray(image)).save(
                tmp, format=Image.registered_extensions()[Path(path).suffix.lower()]
            )
        except OSError as exc:
            raise OutputError(f"cannot write image {path}: {exc}", "check free space and permissions") from None
    return Path(path)
