"""Datasets: Fashion-MNIST (Debian files, a directory, a checked download), image trees, items and subsets."""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from keyedge.data import datasets as data
from keyedge.data.datasets import DatasetInfo, load_dataset
from keyedge.errors import DataError, ImageError, KeyedgeError

DEBIAN = data.FASHION_MNIST_DEBIAN
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(), reason="needs apt-get install dataset-fashion-mnist"
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written by hand: magic 0x08<ndim>, big-endian dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Hide the Debian files and point the download cache into tmp_path; return the cache directory."""
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "keyedge" / "fashion-mnist"


# -- Fashion-MNIST from the Debian package --------------------------------------------------------------------------


@needs_debian
def test_fashion_mnist_splits_and_items():
    train, info = load_dataset("fashion-mnist", "train", 32)
    test, test_info = load_dataset("fashion-mnist", "test", 32)
    assert (len(train), len(test)) == (60000, 10000)
    assert info == test_info == DatasetInfo("fashion-mnist", 10, data.FASHION_MNIST_CLASSES, str(DEBIAN))
    assert info.classes[0] == "T-shirt/top" and info.classes[9] == "Ankle boot"
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10
    for i in (0, 1, 59999):
        x, y = train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale repeated on 3 channels
        assert type(y) is int and 0 <= y <= 9 and y == train.labels[i]
    x28, _ = load_dataset("fashion-mnist", "test", 28)[0][5]
    assert torch.equal(x28[0], torch.from_numpy(test.images[5]).float() / 255)  # native size: no resampling


@needs_debian
def test_fashion_mnist_limit_is_stratified_and_seeded():
    a, _ = load_dataset("fashion-mnist", "test", 28, limit=100, seed=0)
    b, _ = load_dataset("fashion-mnist", "test", 28, limit=100, seed=0)
    c, _ = load_dataset("fashion-mnist", "test", 28, limit=100, seed=1)
    assert len(a) == 100 and np.bincount(a.labels, minlength=10).tolist() == [10] * 10
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(c.labels, minlength=10).tolist() == [10] * 10
    assert len(load_dataset("fashion-mnist", "test", 28, limit=10**6)[0]) == 10000


@needs_debian
@pytest.mark.parametrize("name", sorted(data.FASHION_MNIST_GZ_MD5))
def test_debian_files_match_the_published_md5s(name):
    path = DEBIAN / f"{name}.gz"
    # Debian re-compressed Zalando's .gz files, so their bytes (and MD5s) differ from the published
    # ones; what can be checked is the decompressed content, against the uncompressed files' MD5s.
    with gzip.open(path, "rb") as fh:
        assert hashlib.md5(fh.read()).hexdigest() == data.FASHION_MNIST_RAW_MD5[name]
    data.verify_fashion_mnist_file(path, name)  # what a download is checked with accepts them


# -- Fashion-MNIST from a directory ---------------------------------------------------------------------------------


def write_tiny_fmnist(directory, *, compress: bool, split: str = "test"):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 3, 9, 3, 1, 0], dtype=np.uint8)
    directory.mkdir(exist_ok=True)
    for name, array in zip(data.FASHION_MNIST_FILES[split], (images, labels)):
        blob = idx_bytes(array)
        (directory / (name + ".gz" if compress else name)).write_bytes(gzip.compress(blob) if compress else blob)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_a_directory(tmp_path, compress, no_system_fmnist):
    images, labels = write_tiny_fmnist(tmp_path / "fm", compress=compress)
    ds, info = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", "test", 8)
    assert info.source == str(tmp_path / "fm") and info.num_classes == 10
    assert len(ds) == 6 and ds.labels.tolist() == labels.tolist()
    for i in range(6):
        x, y = ds[i]
        assert y == labels[i] and x.shape == (3, 8, 8)
        assert torch.equal(x, torch.from_numpy(images[i]).float().div(255).expand(3, 8, 8))
    x, _ = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", "test", 20)[0][2]
    want = F.interpolate(
        torch.from_numpy(images[2]).float().div(255)[None, None],
        size=(20, 20),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    ).clamp(0, 1)[0, 0]
    assert x.shape == (3, 20, 20) and torch.allclose(x[1], want, atol=1e-6)
    with pytest.raises(DataError, match="train files not found"):  # only the test pair is there
        load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", "train", 8)


def corrupt(kind: str, directory):
    images_name, labels_name = data.FASHION_MNIST_FILES["test"]
    images, labels = directory / images_name, directory / labels_name
    if kind == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    elif kind == "truncated":
        images.write_bytes(images.read_bytes()[:-7])
    elif kind == "header":
        labels.write_bytes(b"\x00\x00\x08")
    elif kind == "extra-bytes":
        labels.write_bytes(labels.read_bytes() + b"\x01")
    elif kind == "count-mismatch":
        labels.write_bytes(idx_bytes(np.zeros(5)))
    elif kind == "bad-label":
        labels.write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 10])))
    elif kind == "truncated-gzip":
        images.unlink()
        (directory / f"{images_name}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((6, 8, 8))))[:-20])


@pytest.mark.parametrize(
    "kind", ["magic", "truncated", "header", "extra-bytes", "count-mismatch", "bad-label", "truncated-gzip"]
)
def test_malformed_idx_files_are_refused(tmp_path, kind):
    write_tiny_fmnist(tmp_path, compress=False)
    corrupt(kind, tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(f"fashion-mnist:{tmp_path}", "test", 8)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_fashion_mnist_names_the_fixes(no_system_fmnist):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", "test", 28)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "fashion-mnist:DIR" in str(err.value)
    assert "download" in str(err.value)


# -- downloads (the URL opener is faked: never the real network) ---------------------------------------------------


def fake_opener(payload, requested):
    def urlopen(url, timeout=None):
        requested.append(url)
        body = payload(url)
        if isinstance(body, Exception):
            raise body
        return body if not isinstance(body, bytes) else io.BytesIO(body)

    return urlopen


def debian_bytes(url: str) -> bytes:
    return (DEBIAN / url.rsplit("/", 1)[1]).read_bytes()


@needs_debian
def test_download_is_checked_and_lands_in_the_cache(monkeypatch, no_system_fmnist):
    requested = []
    monkeypatch.setattr(data, "urlopen", fake_opener(debian_bytes, requested))
    ds, info = load_dataset("fashion-mnist", "test", 28, download=True)
    assert len(ds) == 10000 and info.source == str(no_system_fmnist)
    assert requested == [data.FASHION_MNIST_MIRRORS[0] + f"{n}.gz" for n in data.FASHION_MNIST_FILES["test"]]
    assert sorted(p.name for p in no_system_fmnist.iterdir()) == sorted(
        f"{n}.gz" for n in data.FASHION_MNIST_FILES["test"]
    )
    requested.clear()
    assert len(load_dataset("fashion-mnist", "test", 28, download=True)[0]) == 10000
    assert requested == []  # present files are not fetched again


@needs_debian
def test_corrupted_download_is_rejected_and_leaves_nothing(monkeypatch, no_system_fmnist):
    def damaged(url):
        blob = bytearray(debian_bytes(url))
        blob[len(blob) // 2] ^= 0xFF
        return bytes(blob)

    requested = []
    monkeypatch.setattr(data, "urlopen", fake_opener(damaged, requested))
    with pytest.raises(DataError, match="MD5"):
        load_dataset("fashion-mnist", "test", 28, download=True)
    assert len(requested) == len(data.FASHION_MNIST_MIRRORS)  # every mirror tried, then given up
    assert list(no_system_fmnist.iterdir()) == []


class BrokenStream(io.BytesIO):
    def read(self, size=-1):
        if self.tell() > 1000:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(min(size, 600) if size and size > 0 else 600)


@pytest.mark.parametrize("failure", ["unreachable", "http-404", "reset-mid-stream"])
def test_network_failure_is_one_error_and_leaves_nothing(monkeypatch, no_system_fmnist, failure):
    def payload(url):
        if failure == "unreachable":
            return urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        if failure == "http-404":
            return urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return BrokenStream(b"\x1f\x8b" + bytes(5000))

    monkeypatch.setattr(data, "urlopen", fake_opener(payload, []))
    with pytest.raises(DataError, match="download failed") as err:
        load_dataset("fashion-mnist", "test", 28, download=True)
    assert "\n" not in str(err.value)
    assert list(no_system_fmnist.iterdir()) == []


def test_md5_check_accepts_the_original_gz_and_its_content(tmp_path, monkeypatch):
    name = "t10k-labels-idx1-ubyte"
    content = idx_bytes(np.arange(10))
    raw, packed = tmp_path / "raw", tmp_path / "packed.gz"
    raw.write_bytes(content)
    packed.write_bytes(gzip.compress(content, mtime=0))
    monkeypatch.setitem(data.FASHION_MNIST_GZ_MD5, name, hashlib.md5(packed.read_bytes()).hexdigest())
    data.verify_fashion_mnist_file(packed, name)  # byte-identical .gz
    monkeypatch.setitem(data.FASHION_MNIST_GZ_MD5, name, "0" * 32)
    monkeypatch.setitem(data.FASHION_MNIST_RAW_MD5, name, hashlib.md5(content).hexdigest())
    data.verify_fashion_mnist_file(packed, name)  # re-compressed, same content
    data.verify_fashion_mnist_file(raw, name)
    with pytest.raises(DataError, match="MD5"):
        data.verify_fashion_mnist_file(tmp_path / "packed.gz", "t10k-images-idx3-ubyte")


# -- image trees ----------------------------------------------------------------------------------------------------

COLORS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "owl": (90, 90, 90)}


def write_tree(root, counts: dict[str, int], size=(12, 10)):
    """Uniformly coloured PNGs (the colour tells the class); the owls are grayscale files."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            color = COLORS[name]
            img = Image.new("L", size, color[0]) if name == "owl" else Image.new("RGB", size, color)
            img.save(root / name / f"{i:02d}.png")


def assert_labels_match_colors(ds, classes):
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        want = torch.tensor(COLORS[classes[y]], dtype=torch.float32) / 255
        assert torch.allclose(x.mean(dim=(1, 2)), want, atol=1e-5)


def test_image_tree_split_by_seed(tmp_path):
    write_tree(tmp_path, {"cat": 5, "dog": 5, "owl": 10})
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "readme.md").write_text("not an image")
    train, info = load_dataset(str(tmp_path), "train", 16)
    test, test_info = load_dataset(f"imagefolder:{tmp_path}", "test", 16)
    assert info == test_info == DatasetInfo("imagefolder", 3, ("cat", "dog", "owl"), str(tmp_path.resolve()))
    assert np.bincount(train.labels).tolist() == [4, 4, 8] and np.bincount(test.labels).tolist() == [1, 1, 2]
    assert not set(train.paths) & set(test.paths) and len(set(train.paths) | set(test.paths)) == 20
    assert_labels_match_colors(train, info.classes)
    assert_labels_match_colors(test, info.classes)
    assert load_dataset(str(tmp_path), "test", 16, seed=0)[0].paths == test.paths  # deterministic
    assert any(load_dataset(str(tmp_path), "test", 16, seed=s)[0].paths != test.paths for s in range(1, 6))
    small, _ = load_dataset(str(tmp_path), "train", 16, limit=8)
    assert np.bincount(small.labels).tolist() == [2, 2, 4] and set(small.paths) <= set(train.paths)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_image_tree_with_train_and_held_out_directories(tmp_path, held_out):
    write_tree(tmp_path / "train", {"cat": 3, "dog": 2, "owl": 2}, size=(7, 9))
    write_tree(tmp_path / held_out, {"cat": 1, "owl": 2})  # a class may be absent from the held-out tree
    train, info = load_dataset(f"imagefolder:{tmp_path}", "train", 16)
    test, _ = load_dataset(f"imagefolder:{tmp_path}", "test", 16, seed=3)
    assert info.classes == ("cat", "dog", "owl") and info.num_classes == 3
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 2, 2]
    assert all(held_out in p.parts for p in test.paths)
    assert_labels_match_colors(train, info.classes)
    assert_labels_match_colors(test, info.classes)


def test_bad_image_trees_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}", "train", 16)
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing"), "train", 16)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path / "empty"), "train", 16)
    write_tree(tmp_path / "gap", {"cat": 2})
    (tmp_path / "gap" / "dog").mkdir()
    with pytest.raises(DataError, match="dog has no images"):
        load_dataset(str(tmp_path / "gap"), "train", 16)
    write_tree(tmp_path / "split" / "train", {"cat": 2})
    write_tree(tmp_path / "split" / "val", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="lacks: dog"):
        load_dataset(str(tmp_path / "split"), "test", 16)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'file.png'}", "train", 16)


def test_unreadable_image_is_an_image_error(tmp_path):
    write_tree(tmp_path, {"cat": 2})
    (tmp_path / "cat" / "00.png").write_bytes(b"not a png")
    train, test = (load_dataset(str(tmp_path), split, 16)[0] for split in ("train", "test"))
    with pytest.raises(ImageError, match=r"00\.png"):
        [ds[0] for ds in (train, test)]


def test_items_batch_through_a_dataloader(tmp_path):
    write_tree(tmp_path, {"cat": 5, "dog": 5})
    ds, _ = load_dataset(str(tmp_path), "train", 16)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.int64


# -- foolbox's ImageNet samples (a stand-in package: foolbox is not a dependency) ---------------------------------


def test_foolbox_imagenet_samples(tmp_path, monkeypatch):
    pkg = tmp_path / "foolbox"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('find_spec must not import foolbox')\n")
    for idx, label in ((0, 243), (1, 559), (2, 7)):
        Image.new("RGB", (30, 20), (label % 256, 0, 0)).save(pkg / "data" / f"imagenet_{idx:02d}_{label}.jpg")
    Image.new("RGB", (8, 8)).save(pkg / "data" / "cifar10_00_3.png")
    monkeypatch.syspath_prepend(str(tmp_path))
    ds, info = load_dataset("foolbox-imagenet", "test", 24)
    assert info.num_classes == 1000 and len(info.classes) == 1000 and info.source == str(pkg / "data")
    assert ds.labels.tolist() == [243, 559, 7] and ds[1][0].shape == (3, 24, 24) and ds[1][1] == 559
    with pytest.raises(DataError, match="only a test split"):
        load_dataset("foolbox-imagenet", "train", 24)


def test_foolbox_imagenet_without_foolbox(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KeyedgeError, match="pip install foolbox"):
        load_dataset("foolbox-imagenet", "test", 24)


# -- arguments ------------------------------------------------------------------------------------------------------


def test_unknown_dataset_and_bad_arguments(tmp_path):
    with pytest.raises(KeyedgeError) as err:
        load_dataset("cifar10", "train", 32)
    assert str(err.value) == (
        "unknown dataset 'cifar10'; use fashion-mnist, fashion-mnist:DIR, imagefolder:DIR or a directory"
    )
    write_tree(tmp_path, {"cat": 2, "dog": 2})
    for kwargs, match in [
        ({"split": "val"}, "unknown split 'val'"),
        ({"image_size": 0}, "image size"),
        ({"image_size": 2.5}, "image size"),
        ({"limit": 0}, "limit"),
        ({"seed": -1}, "seed"),
    ]:
        args = {"data": str(tmp_path), "split": "train", "image_size": 16, **kwargs}
        with pytest.raises(KeyedgeError, match=match):
            load_dataset(**args)
    for bare in ("fashion-mnist:", "imagefolder:"):
        with pytest.raises(KeyedgeError, match="needs a directory"):
            load_dataset(bare, "train", 16)


def test_stratified_indices_keep_class_proportions():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    picked = data.stratified_indices(labels, 10, seed=4)
    assert np.bincount(labels[picked]).tolist() == [5, 3, 2] and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, data.stratified_indices(labels, 10, seed=4))
    assert len(data.stratified_indices(labels, 7, seed=0)) == 7
