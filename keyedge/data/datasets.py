"""Labelled image datasets for fine-tuning and evaluation, as torch Datasets of ``(x, y)``.

``x`` is a float32 (3, S, S) tensor in [0, 1] -- grayscale repeated on 3
channels, resized to the model's square input size S (bilinear, antialiased),
not normalized (the model does that) -- and ``y`` an int class index.

:func:`load_dataset` understands:

* ``fashion-mnist`` -- the IDX files of Debian's ``dataset-fashion-mnist``
  package, else ``~/.cache/keyedge/fashion-mnist/`` (filled on request by a
  download whose MD5s are checked); ``fashion-mnist:DIR`` reads them from DIR;
* ``imagefolder:DIR`` or a directory -- one subdirectory per class, with
  ``train/`` and ``val/`` (or ``test/``) trees or else a seeded 80/20 split;
* ``foolbox-imagenet`` -- the 20 ImageNet photos inside the ``foolbox`` wheel.

Images are kept decoded as uint8 arrays (or as file paths, for image trees) and
converted per item in ``__getitem__``, so DataLoader workers share that work.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import os
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from keyedge.data.images import read_image
from keyedge.errors import DataError, DependencyError, KeyedgeError, OutputError
from keyedge.fileio import atomic_output

SPLITS = ("train", "test")

#: Image file suffixes read in image trees (those torchvision's ImageFolder reads).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Download locations, tried in order.  S3 website endpoints serve plain HTTP only;
#: the MD5 check below, not the transport, is what vouches for the files.
FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
#: MD5s of the original ``.gz`` files, as published by Zalando.
FASHION_MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: MD5s of the decompressed IDX files.  Debian's package re-compressed the ``.gz``
#: files (their MD5s differ from Zalando's) but their contents match these, which
#: are the ones other loaders (e.g. MindSpore's) publish for the uncompressed files.
FASHION_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DOWNLOAD_TIMEOUT_S = 60

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 and 1 dimensions
_SPLIT_STREAM, _LIMIT_STREAM = 1, 2  # independent random streams drawn from one seed
_FOOLBOX_IMAGENET = re.compile(r"imagenet_(\d+)_(\d+)\.(?:jpg|jpeg|png)$")
_UNKNOWN_HINT = "use fashion-mnist, fashion-mnist:DIR, imagefolder:DIR or a directory"


@dataclass(frozen=True)
class DatasetInfo:
    """What a loaded dataset is, for the model head and checkpoint manifests."""

    name: str
    num_classes: int
    classes: tuple[str, ...]
    source: str


# -- per-item conversion ----------------------------------------------------------------------------------------------


def to_model_input(image: np.ndarray, image_size: int) -> torch.Tensor:
    """A uint8 (H, W) or (H, W, 3) image as a float32 (3, S, S) tensor in [0, 1]."""
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"]))  # no copy unless read-only
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(
            x.unsqueeze(0), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp_(0.0, 1.0)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


class ImageArrayDataset(Dataset):
    """Labelled images held decoded in memory: uint8 (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_model_input(self.images[index], self.image_size), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> ImageArrayDataset:
        return ImageArrayDataset(self.images[indices], self.labels[indices], self.image_size)


class ImageFileDataset(Dataset):
    """Labelled image files, decoded (as RGB) when an item is read."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, image_size: int):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_model_input(read_image(self.paths[index]), self.image_size), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> ImageFileDataset:
        return ImageFileDataset([self.paths[i] for i in indices], self.labels[indices], self.image_size)


def stratified_indices(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` items, each class represented in proportion to its size.

    Quotas are rounded by largest remainder (ties broken at random); which items
    fill them is drawn with ``seed``.
    """
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, _LIMIT_STREAM])
    classes, counts = np.unique(labels, return_counts=True)
    exact = limit * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.permutation(len(classes)), -(exact - quota)))  # largest remainder first
    quota[order[: limit - int(quota.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


# -- Fashion-MNIST ----------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """keyedge's download cache: ``$XDG_CACHE_HOME/keyedge`` (``~/.cache/keyedge``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keyedge"


def _md5_file(path: Path, *, gunzip: bool = False) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with gzip.open(path, "rb") if gunzip else open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_fashion_mnist_file(path: str | os.PathLike, name: str) -> None:
    """Raise :class:`DataError` unless ``path`` holds Fashion-MNIST's ``name`` file.

    Accepts Zalando's ``.gz`` byte for byte, or any gzip (or raw) file whose
    decompressed content has the published MD5 -- Debian's re-compressed copies.
    """
    path = Path(path)
    digest = _md5_file(path)
    if digest in (FASHION_MNIST_GZ_MD5[name], FASHION_MNIST_RAW_MD5[name]):
        return
    try:
        if _md5_file(path, gunzip=True) == FASHION_MNIST_RAW_MD5[name]:
            return
    except (OSError, EOFError, zlib.error):  # not gzip, or a truncated one
        pass
    raise DataError(
        f"{path.name} failed its MD5 check (got {digest}, expected {FASHION_MNIST_GZ_MD5[name]})",
        "the download is corrupted or incomplete; try again",
    )


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fetch(url: str, dest: Path) -> None:
    try:
        with urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"cannot download {url}: {reason}", "check the network connection") from None


def download_fashion_mnist(directory: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS) -> Path:
    """Download the Fashion-MNIST files of ``splits`` missing from ``directory``; return it.

    The default directory is ``cache_dir() / "fashion-mnist"``.  Each file is
    written to a temporary name, MD5-checked and only then renamed into place:
    a failed or corrupted download leaves nothing behind.
    """
    directory = Path(directory) if directory is not None else cache_dir() / "fashion-mnist"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {directory}: {exc.strerror}", "choose a writable location") from None
    for name in (n for split in splits for n in FASHION_MNIST_FILES[split]):
        if _find_idx(directory, name):
            continue
        failure: DataError | None = None
        for mirror in FASHION_MNIST_MIRRORS:
            try:
                with atomic_output(directory / f"{name}.gz", overwrite=True) as tmp:
                    _fetch(mirror + f"{name}.gz", tmp)
                    verify_fashion_mnist_file(tmp, name)
                break
            except DataError as exc:
                failure = exc
        else:
            assert failure is not None
            raise DataError(
                f"Fashion-MNIST download failed: {failure.message}",
                "check the network connection, or apt-get install dataset-fashion-mnist",
            )
    return directory


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not) of unsigned bytes into a writable uint8 array."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}", "the file may be damaged; replace it") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {magic})",
            "the file may be damaged or of another kind; replace it",
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise DataError(
            f"{path} holds {len(data) - header} bytes of data, its header announces {dims}",
            "the file is truncated or damaged; replace it",
        )
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(
    directory: Path | None, split: str, image_size: int, download: bool
) -> tuple[ImageArrayDataset, DatasetInfo]:
    names = FASHION_MNIST_FILES[split]
    searched = [directory] if directory is not None else [FASHION_MNIST_DEBIAN, cache_dir() / "fashion-mnist"]
    found = next((d for d in searched if all(_find_idx(d, n) for n in names)), None)
    if found is None and download:
        found = download_fashion_mnist(searched[-1], [split])
    if found is None:
        where = " or ".join(str(d) for d in searched)
        raise DataError(
            f"Fashion-MNIST {split} files not found in {where}",
            "apt-get install dataset-fashion-mnist, use --data fashion-mnist:DIR, or download them (download=True)",
        )
    images = read_idx(_find_idx(found, names[0]), _IDX_IMAGES)
    labels = read_idx(_find_idx(found, names[1]), _IDX_LABELS)
    if len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split} in {found}: {len(images)} images but {len(labels)} labels",
            "the files do not belong together; replace them",
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"Fashion-MNIST {split} labels in {found} go up to {labels.max()}, expected 0..9",
            "these are not Fashion-MNIST labels; replace the file",
        )
    info = DatasetInfo("fashion-mnist", len(FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES, str(found))
    return ImageArrayDataset(images, labels, image_size), info


# -- image trees ------------------------------------------------------------------------------------------------------


def _subdirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(parent, f) for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found


def _scan_tree(root: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """Classes, image paths and labels of an image tree.

    A training tree (``classes`` None) defines the classes: its sorted
    subdirectory names, each of which must hold images.  A held-out tree is
    read against given classes; it may lack some but may not add any.
    """
    names, training = _subdirs(root), classes is None
    if not training and (extra := sorted(set(names) - set(classes))):
        raise DataError(
            f"{root} has class directories the training tree lacks: {', '.join(extra[:5])}",
            "both trees need the same class subdirectories",
        )
    classes = tuple(names if training else classes)
    per_class = [_image_files(root / name) if name in names else [] for name in classes]
    if not any(per_class):
        raise DataError(
            f"no images found in class subdirectories of {root}",
            "expected one subdirectory per class with images inside (PNG, JPEG...)",
        )
    if training and (empty := [n for n, files in zip(classes, per_class) if not files]):
        raise DataError(f"class directory {root / empty[0]} has no images", "add images or remove it")
    paths = [path for files in per_class for path in files]
    labels = np.repeat(np.arange(len(classes)), [len(files) for files in per_class])
    return classes, paths, labels.astype(np.int64)


def _seeded_split(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` in a per-class 80/20 train/test split drawn with ``seed``."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = min(max(round(0.2 * len(members)), 1), len(members) - 1)  # >= 1 each side when possible
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _load_image_folder(root: Path, split: str, image_size: int, seed: int) -> tuple[ImageFileDataset, DatasetInfo]:
    root = root.expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset directory {root} not found" if not root.exists() else f"{root} is not a directory",
            "give a directory with one subdirectory of images per class",
        )
    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        classes, paths, labels = _scan_tree(root / "train")
        if split == "test":
            _, paths, labels = _scan_tree(held_out, classes)
        dataset = ImageFileDataset(paths, labels, image_size)
    else:
        classes, paths, labels = _scan_tree(root)
        dataset = ImageFileDataset(paths, labels, image_size).subset(_seeded_split(labels, split, seed))
    return dataset, DatasetInfo("imagefolder", len(classes), classes, str(root.resolve()))


# -- foolbox's ImageNet samples ---------------------------------------------------------------------------------------


def _load_foolbox_imagenet(image_size: int) -> tuple[ImageFileDataset, DatasetInfo]:
    try:
        spec = importlib.util.find_spec("foolbox")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(
            "foolbox-imagenet reads the sample photos of the foolbox package, which is not installed",
            "pip install foolbox",
        )
    data_dirs = [Path(p) / "data" for p in spec.submodule_search_locations]
    found = sorted(
        (int(m[1]), int(m[2]), p)
        for d in data_dirs
        if d.is_dir()
        for p in d.iterdir()
        if (m := _FOOLBOX_IMAGENET.fullmatch(p.name))
    )
    if not found:
        raise DataError(f"no ImageNet samples (imagenet_NN_LABEL.jpg) in {data_dirs[0]}", "pip install foolbox==3.3.4")
    from timm.data import ImageNetInfo

    imagenet = ImageNetInfo()
    classes = tuple(imagenet.index_to_description(i) for i in range(imagenet.num_classes()))
    dataset = ImageFileDataset([p for _, _, p in found], np.array([label for _, label, _ in found]), image_size)
    return dataset, DatasetInfo("foolbox-imagenet", len(classes), classes, str(found[0][2].parent))


# -- entry point ------------------------------------------------------------------------------------------------------


def load_dataset(
    data: str, split: str, image_size: int, *, limit: int | None = None, seed: int = 0, download: bool = False
) -> tuple[Dataset, DatasetInfo]:
    """The ``split`` ("train" or "test") of dataset ``data`` as ``(x, y)`` items of size ``image_size``.

    ``limit`` keeps a class-stratified subset of at most that many items, drawn
    with ``seed`` (which also draws the 80/20 split of an unsplit image tree).
    ``download`` lets a missing Fashion-MNIST be downloaded.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", "use train or test")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}", "leave it out to use the whole split")
    if seed < 0:
        raise DataError(f"seed must not be negative, got {seed}")
    kind, sep, rest = data.partition(":")
    dataset: ImageArrayDataset | ImageFileDataset
    if data == "fashion-mnist" or (kind == "fashion-mnist" and sep):
        if sep and not rest:
            raise DataError("fashion-mnist: needs a directory after the colon", "e.g. fashion-mnist:~/data/fmnist")
        directory = Path(rest).expanduser() if rest else None
        dataset, info = _load_fashion_mnist(directory, split, int(image_size), download)
    elif kind == "imagefolder" and sep:
        if not rest:
            raise DataError("imagefolder: needs a directory after the colon", "e.g. imagefolder:~/data/flowers")
        dataset, info = _load_image_folder(Path(rest), split, int(image_size), seed)
    elif data == "foolbox-imagenet":
        if split != "test":
            raise DataError("foolbox-imagenet has only a test split", "use it for evaluation only")
        dataset, info = _load_foolbox_imagenet(int(image_size))
    elif Path(data).expanduser().is_dir() or "/" in data or os.sep in data or data.startswith((".", "~")):
        dataset, info = _load_image_folder(Path(data), split, int(image_size), seed)
    else:
        raise KeyedgeError(f"unknown dataset {data!r}", _UNKNOWN_HINT)
    if limit is not None:
        dataset = dataset.subset(stratified_indices(dataset.labels, int(limit), seed))
    return dataset, info
