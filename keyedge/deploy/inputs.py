"""The images export verification and int8 calibration run on: the checkpoint's own data, else sample photos.

Random inputs test every logit; real ones (the checkpoint's test images, else scikit-image's photos)
test what a deployed model sees.  int8 is calibrated on the checkpoint's training images and verified on
its labelled test images (:mod:`keyedge.deploy.parity`'s agreement rule).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keyedge.checkpoints import CheckpointManifest
from keyedge.data.datasets import load_dataset, to_model_input
from keyedge.data.samples import PHOTOS, sample_photo
from keyedge.errors import KeyedgeError

__all__ = ["agreement_inputs", "calibration_images", "int8_images", "labelled_test_images", "real_inputs"]


def real_inputs(manifest: CheckpointManifest, image_size: int, count: int = 8) -> tuple[np.ndarray | None, str]:
    """Real images for parity checks: the checkpoint's test data, else scikit-image's photos.

    Read once per (dataset, size, count) in a process: a fleet's keys share their data (issue 14).
    """
    data = manifest.data
    images, source = _real_inputs(data.get("name"), data.get("source"), image_size, count)
    return (None if images is None else images.copy()), source


def _dataset_specs(data: dict[str, Any]) -> list[str]:
    """The dataset specs a checkpoint's data may be loaded by, in order (its name, then where it came from)."""
    name, source = data.get("name"), data.get("source")
    return [str(c) for c in (name, f"{name}:{source}" if name and source else None, source) if c]


def _load_images(specs: Sequence[str], split: str, image_size: int, count: int, seed: int):
    """The first of ``specs`` that loads: ``(images, labels, info)``, or None when none does."""
    for spec in specs:
        try:
            dataset, info = load_dataset(spec, split, image_size, limit=count, seed=seed)
        except KeyedgeError:
            continue
        items = [dataset[i] for i in range(len(dataset))]
        return np.stack([x.numpy() for x, _ in items]), np.array([int(y) for _, y in items]), info
    return None


@functools.lru_cache(maxsize=8)
def _real_inputs(name: str | None, source: str | None, image_size: int, count: int) -> tuple[np.ndarray | None, str]:
    loaded = _load_images(_dataset_specs({"name": name, "source": source}), "test", image_size, count, 0)
    if loaded is not None:
        return loaded[0], f"{loaded[2].name} test images"
    try:
        photos = [to_model_input(sample_photo(name), image_size).numpy() for name in PHOTOS]
        return np.stack(photos), "scikit-image photos"
    except KeyedgeError:
        return None, "no real images available (install keyedge[samples])"


def labelled_test_images(manifest: CheckpointManifest, image_size: int, count: int):
    """The checkpoint's real test images with labels, ``(images, labels, source)``, or None when not here."""
    loaded = _load_images(_dataset_specs(manifest.data), "test", image_size, count, 0)
    return None if loaded is None else (loaded[0], loaded[1], f"{loaded[2].name} test images")


def agreement_inputs(
    manifest: CheckpointManifest, image_size: int, count: int
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The images an int8 artifact is checked on: labelled test images, else unlabelled real ones (or none)."""
    labelled = labelled_test_images(manifest, image_size, count)
    if labelled is not None:
        return labelled
    images, source = real_inputs(manifest, image_size, count)
    return images, None, source


def calibration_images(
    manifest: CheckpointManifest, image_size: int, data: str | None, count: int, seed: int
) -> tuple[np.ndarray, str]:
    """int8 calibration images: ``count`` training images (class-stratified, ``seed``) of the checkpoint's data.

    They are the raw [0, 1] images the artifact receives: its in-graph shuffle turns them into what the
    keyed model was trained on, so every quantized layer is calibrated on shuffled data.  ``data``
    (``--calibration-data``: a dataset spec as ``keyedge train --data`` takes, or an image directory)
    overrides the checkpoint's.
    """
    if data is not None:
        specs = [f"imagefolder:{data}" if Path(data).expanduser().is_dir() and ":" not in data else data]
    else:
        specs = _dataset_specs(manifest.data)
    loaded = _load_images(specs, "train", image_size, count, seed)
    if loaded is None:
        what = (
            f"--calibration-data {data}" if data is not None else f"the checkpoint's data ({manifest.data.get('name')})"
        )
        raise KeyedgeError(
            f"int8 needs calibration images, and {what} cannot be loaded here",
            "pass --calibration-data with a dataset (as `keyedge train --data` takes) or a directory of images",
        )
    return loaded[0], f"{len(loaded[0])} {loaded[2].name} training images (seed {seed})"


def int8_images(
    manifest: CheckpointManifest, image_size: int, data: str | None, count: int, seed: int, held: int = 0
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(calibration, held_out, source)``: :func:`calibration_images`, and with ``held`` > 0 that many more training
    images kept apart for accuracy-aware quantization to validate on (a random part of one draw, so never the
    calibration images, nor the test images the agreement rule judges)."""
    images, source = calibration_images(manifest, image_size, data, count + held, seed)
    if not held:
        return images, None, source
    if len(images) <= held:
        raise KeyedgeError(
            f"--int8-accuracy-control needs {count} calibration and {held} held-out training images, and "
            f"{source} is all there is",
            "lower --calibration-size, or drop --int8-accuracy-control",
        )
    order = np.random.default_rng(seed).permutation(len(images))  # the draw's order may follow the classes
    calibration, validation = images[np.sort(order[held:])], images[np.sort(order[:held])]
    return calibration, validation, source.replace(f"{count + held} ", f"{len(calibration)} (+{held} held out) ", 1)
