"""Reading and writing image files for the CLI (Pillow), with keyedge's errors.

Images are handled as (H, W, 3) uint8 arrays: grayscale and palette images are
expanded to RGB and alpha is dropped, as the transform is defined on 3 channels.
16-bit grayscale is scaled to 8 bits (``round(v / 257)``), a float image in
[0, 1] by 255; other deep or float images, and images past Pillow's
decompression-bomb limit, are refused rather than silently clipped.
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
            return _to_rgb8(img, path)
    except Image.DecompressionBombError:
        raise ImageError(
            f"{path} has more pixels than Pillow's safety limit (a decompression bomb?)",
            "resize it to a sane size first",
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{path} is not an image file Pillow can read", "give a PNG, JPEG, BMP or TIFF image"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or broken image data
        raise ImageError(f"cannot read image {path}: {exc}", "the file may be damaged") from None


def _to_rgb8(img, path: Path) -> np.ndarray:
    """8-bit RGB from any Pillow mode, scaling deep images instead of clipping them."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else 65535.0
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > top:
            scale = "[0, 1]" if img.mode == "F" else "[0, 65535]"
            raise ImageError(
                f"{path} holds mode-{img.mode} pixels outside {scale}",
                "convert it to 8-bit RGB first (e.g. PNG)",
            )
        gray = np.rint(values * (255.0 / top)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


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
