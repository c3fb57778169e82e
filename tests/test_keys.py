"""Key derivation, test vectors, fingerprints, the key file format and legacy seed import."""

from __future__ import annotations

import hashlib
import json
import stat
import struct

import numpy as np
import pytest
import torch

from keyedge.errors import KeyFileError, OutputError
from keyedge.keys.keyfile import (
    CHECKSUM_SIZE,
    HEADER_SIZE,
    MAGIC,
    Key,
    derive_permutation,
    fingerprint,
    insecure_permissions,
    load_key,
)

# Published test vectors (also in docs/key-format.md): secret, P, derangement -> first entries, fingerprint.
VECTORS = [
    (bytes(range(32)), 1, True, [2, 0, 1], "88244c814f4e73eb"),
    (bytes(range(32)), 2, True, [1, 11, 0, 10, 3, 9, 2, 4, 5, 6, 7, 8], "2130725b7f820630"),
    (bytes(range(32)), 4, True, [35, 37, 20, 47, 42, 18, 17, 14, 25, 5, 44, 24, 9, 45, 36, 31], "a3aacf2910fa98b9"),
    (bytes(32), 4, True, [21, 33, 6, 30, 26, 31, 41, 44, 18, 43, 14, 3, 1, 24, 10, 19], "56052f761d958354"),
    (bytes(32), 4, False, [19, 27, 23, 35, 9, 18, 0, 3, 25, 20, 4, 31, 5, 47, 42, 12], "773c506c73f4908d"),
    (
        b"\xff" * 32,
        8,
        True,
        [35, 184, 103, 118, 135, 41, 53, 182, 131, 75, 120, 159, 17, 94, 185, 12],
        "111b6ac2566c87e3",
    ),
]


def spec_permutation(secret: bytes, p: int, c: int = 3, derangement: bool = True) -> list[int]:
    """The derivation exactly as docs/key-format.md states it, written independently of keyedge."""
    n = c * p * p
    attempt = 0
    while True:
        stream = hashlib.shake_256(b"keyedge/permutation/v1\x00" + struct.pack("<HHI", p, c, attempt) + secret)
        words = struct.unpack(f"<{8 * n + 256}I", stream.digest(4 * (8 * n + 256)))
        pos, v = 0, list(range(n))
        for i in range(n - 1, 0, -1):
            limit = 2**32 - (2**32 % (i + 1))
            while words[pos] >= limit:
                pos += 1
            j = words[pos] % (i + 1)
            pos += 1
            v[i], v[j] = v[j], v[i]
        if not derangement or all(v[k] != k for k in range(n)):
            return v
        attempt += 1


@pytest.mark.parametrize("secret,p,derangement,head,fp", VECTORS)
def test_published_vectors(secret, p, derangement, head, fp):
    key = Key.from_secret(secret, p, derangement=derangement)
    assert key.permutation[: len(head)].tolist() == head
    assert key.fingerprint == fp
    assert key.permutation.tolist() == spec_permutation(secret, p, derangement=derangement)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8, 16])
def test_derivation_is_a_derangement(p):
    for tag in range(20):
        perm = derive_permutation(bytes([tag, p]) * 16, p)
        assert sorted(perm.tolist()) == list(range(3 * p * p))
        assert not np.any(perm == np.arange(perm.size)), "a default key must move every position"


def test_fixed_points_allowed_on_request_and_reported():
    # bytes(32) with P=4 needs a retry to become a derangement: attempt 0 has fixed points.
    key = Key.from_secret(bytes(32), 4, derangement=False)
    assert key.fixed_points > 0
    assert key.moved_fraction == pytest.approx(1 - key.fixed_points / 48)
    assert Key.from_secret(bytes(32), 4).fixed_points == 0


def test_generated_keys_differ_and_are_deranged():
    a, b = Key.generate(4), Key.generate(4)
    assert a.fingerprint != b.fingerprint
    assert a.fixed_points == b.fixed_points == 0


def test_fingerprint_depends_on_permutation_and_block_size_only(key4):
    again = Key.from_permutation(key4.permutation, 4)
    assert again.fingerprint == key4.fingerprint  # same transform, same fingerprint
    assert fingerprint(key4.permutation, 4) == key4.fingerprint
    swapped = key4.permutation
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprint(swapped, 4) != key4.fingerprint
    assert len(key4.fingerprint) == 16 and int(key4.fingerprint, 16) >= 0


def test_repr_and_describe_never_leak_the_secret(key4):
    text = repr(key4) + str(key4) + json.dumps(key4.describe())
    assert key4.fingerprint in text
    assert 'permutation"' not in json.dumps(key4.describe())
    assert " ".join(map(str, key4.permutation[:6])) not in text
    assert bytes(range(32)).hex() not in text
    assert key4.describe(reveal=True)["permutation"] == key4.permutation.tolist()


def test_file_round_trip_and_permissions(tmp_path, key4):
    path = key4.save(tmp_path / "k1.bin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not insecure_permissions(path)
    loaded = load_key(path)
    assert loaded == key4 and loaded.fingerprint == key4.fingerprint
    assert np.array_equal(loaded.permutation, key4.permutation)
    assert [p.name for p in tmp_path.iterdir()] == ["k1.bin"], "no temporary file may remain"


def test_save_refuses_to_overwrite_unless_asked(tmp_path, key4, make_key):
    path = key4.save(tmp_path / "k.bin")
    other = make_key(4)
    with pytest.raises(OutputError, match="already exists"):
        other.save(path)
    assert load_key(path) == key4, "the existing key must be untouched"
    other.save(path, overwrite=True)
    assert load_key(path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_layout_is_as_documented(key4):
    data = key4.to_bytes()
    assert data[:8] == MAGIC
    _magic, version, p, c, kind, flags, length = struct.unpack_from("<8sHHBBHI", data)
    assert (version, p, c, kind, flags, length) == (1, 4, 3, 1, 1, 32)
    assert data[HEADER_SIZE : HEADER_SIZE + 32] == bytes(range(32))
    assert data[-CHECKSUM_SIZE:] == hashlib.sha256(data[:-CHECKSUM_SIZE]).digest()
    assert len(data) == HEADER_SIZE + 32 + CHECKSUM_SIZE


@pytest.mark.parametrize("seed,p", [(1234, 4), (0, 2), (42, 8), (2**63 + 5, 4)])
def test_legacy_seed_import_equals_reference_code(seed, p, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the reference code, verbatim
        reference = torch.randperm(3 * p * p)
    key = Key.from_seed(seed, p)
    assert key.permutation.tolist() == reference.tolist()
    loaded = load_key(key.save(tmp_path / "legacy.bin"))
    assert loaded.permutation.tolist() == reference.tolist()
    assert loaded.seed == seed and loaded.source == "reference-seed"
    assert loaded.key_space_bits <= 64


def test_legacy_import_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    Key.from_seed(1234, 4)
    assert torch.equal(torch.rand(3), expected)


def _corrupt(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    "name,mutate,message",
    [
        ("empty", lambda d: b"", "is empty"),
        ("truncated-magic", lambda d: d[:5], "truncated"),
        ("truncated-header", lambda d: d[:12], "truncated"),
        ("truncated-payload", lambda d: d[:-10], "truncated"),
        ("trailing", lambda d: d + b"\0", "trailing"),
        ("foreign", lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "not a keyedge key file"),
        ("text", lambda d: b"hello, I am a text file\n", "not a keyedge key file"),
        ("bitflip-secret", lambda d: _corrupt(d, HEADER_SIZE + 3), "integrity check"),
        ("bitflip-checksum", lambda d: _corrupt(d, len(d) - 1), "integrity check"),
        ("future-version", lambda d: _reseal(d[:8] + struct.pack("<H", 2) + d[10:-32]), "newer than this keyedge"),
        ("version-zero", lambda d: _reseal(d[:8] + struct.pack("<H", 0) + d[10:-32]), "invalid format version"),
        ("unknown-kind", lambda d: _reseal(d[:13] + b"\x09" + d[14:-32]), "unknown key kind"),
        ("unknown-flags", lambda d: _reseal(d[:14] + struct.pack("<H", 0x80) + d[16:-32]), "unknown flags"),
        ("block-zero", lambda d: _reseal(d[:10] + struct.pack("<H", 0) + d[12:-32]), "out of range"),
    ],
)
def test_bad_key_files_are_rejected_clearly(tmp_path, key4, name, mutate, message):
    path = tmp_path / f"{name}.bin"
    path.write_bytes(mutate(key4.to_bytes()))
    with pytest.raises(KeyFileError, match=message) as info:
        load_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_future_version_is_reported_before_checksum(tmp_path, key4):
    # a v2 file may have a different layout: the version must be checked before anything else
    data = bytearray(key4.to_bytes())
    data[8:10] = struct.pack("<H", 3)
    data += b"extra v3 fields"
    path = tmp_path / "v3.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(KeyFileError, match="version 3, newer"):
        load_key(path)


def test_invalid_stored_permutation_is_rejected(key4):
    legacy = Key.from_permutation(key4.permutation, 4)
    body = bytearray(legacy.to_bytes()[:-CHECKSUM_SIZE])
    body[HEADER_SIZE : HEADER_SIZE + 2] = body[HEADER_SIZE + 2 : HEADER_SIZE + 4]  # duplicate an entry
    with pytest.raises(KeyFileError, match="invalid permutation"):
        Key.from_bytes(_reseal(bytes(body)))


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "nope.bin")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_key(tmp_path)


def test_insecure_permissions_detected(tmp_path, key4):
    path = key4.save(tmp_path / "k.bin")
    path.chmod(0o644)
    assert insecure_permissions(path)
