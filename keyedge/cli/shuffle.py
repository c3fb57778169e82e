"""``keyedge shuffle``: see what a keyed model sees (the paper's Fig. 5), or undo it."""

from __future__ import annotations

from pathlib import Path

import typer

from keyedge.cli._console import console, err_console
from keyedge.cli._flags import key_file_option, old_force, overwrite_option
from keyedge.data.images import LOSSLESS_SUFFIXES, check_image_suffix, read_image, write_image
from keyedge.fileio import check_writable
from keyedge.keys.keyfile import load_key


def shuffle(
    image: Path = typer.Argument(..., help="Image file (PNG, JPEG, ...); grayscale is expanded to RGB."),
    key_file: Path = key_file_option("Secret key file.", required=True),
    out: Path = typer.Option(..., "--out", "-o", help="Output image; use .png to keep it exactly invertible."),
    inverse: bool = typer.Option(False, "--inverse", help="Undo the shuffle instead."),
    overwrite: bool = overwrite_option("Replace OUT if it exists."),
    force: bool = old_force(),
) -> None:
    """Apply a key's block-wise pixel shuffle (or its inverse) to an image."""
    from keyedge.keys.transform import HostShuffle, check_divisible  # imports torch: only when needed

    overwrite = overwrite or force
    check_image_suffix(out)
    check_writable(out, overwrite=overwrite, flag="--overwrite")
    key = load_key(key_file)
    pixels = read_image(image)
    height, width = pixels.shape[:2]
    check_divisible(height, width, key.block_size, what=f"image {image}")
    result = HostShuffle.from_key(key, (height, width), inverse=inverse).image(pixels)
    write_image(out, result, overwrite=overwrite)
    verb = "un-shuffled" if inverse else "shuffled"
    console.print(
        f"wrote {out} ({width}x{height}, {verb} with key {key.fingerprint}, block size {key.block_size})", markup=False
    )
    if out.suffix.lower() not in LOSSLESS_SUFFIXES:
        err_console.print(
            f"note: {out.suffix} is lossy, so {out} cannot be un-shuffled exactly; use .png", markup=False
        )


def register(app: typer.Typer) -> None:
    app.command("shuffle")(shuffle)
