"""Secret keys: derivation of the block permutation, fingerprints, and the key file format.

A key is the secret behind one deployed model.  It fixes the block size ``P``
and one permutation ``v`` of the ``C*P*P`` values of a block (docs/design.md §1-§2).

Derivation (platform-independent, documented in ``docs/key-format.md``)::

    for attempt = 0, 1, 2, ...:
        stream = SHAKE-256("keyedge/permutation/v1\\0" || u16le(P) || u16le(C) || u32le(attempt) || secret)
        v = [0, 1, ..., n-1]                      # n = C*P*P
        for i = n-1 down to 1:                    # Fisher-Yates, unbiased
            draw u32le words u from the stream until u < 2**32 - (2**32 mod (i+1))
            j = u mod (i+1); swap v[i], v[j]
        if not derangement required or v has no fixed point: return v

Fingerprint: the first 16 hex digits of
``SHA-256("keyedge/fingerprint/v1\\0" || u16le(P) || u16le(C) || u16le(v[0]) ... u16le(v[n-1]))``.
It identifies the *transform* (two files holding the same permutation share it)
and reveals nothing usable about it: inverting it means searching the key space.

This module deliberately imports neither torch nor timm, so key handling is fast.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keyedge.errors import KeyFileError
from keyedge.fileio import note_kept, write_bytes_atomic

MAGIC = b"KEYEDGE\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHBBHI")  # magic, version, block size, channels, kind, flags, payload length
HEADER_SIZE = _HEADER.size  # 20
CHECKSUM_SIZE = 32  # SHA-256 of everything before it

KIND_SECRET = 1  # payload: the secret; the permutation is derived from it
KIND_PERMUTATION = 2  # payload: [u64 seed if FLAG_SEED] + the permutation as u16le (imported keys)
KIND_SEAL = 3  # payload: a 256-bit AES key that seals artifacts at rest (keyedge.keys.seal); no block geometry
KIND_SIGN = 4  # payload: an Ed25519 private key (32-byte seed) that signs manifests (keyedge.keys.signing)
KIND_VERIFY = 5  # payload: the matching Ed25519 public key (shareable)
#: what each kind is, for "X is <kind>, not ..." messages
KIND_NAMES = {
    KIND_SECRET: "a shuffle key",
    KIND_PERMUTATION: "a shuffle key",
    KIND_SEAL: "a sealing key",
    KIND_SIGN: "a manifest signing key",
    KIND_VERIFY: "a manifest verify key",
}
FLAG_DERANGEMENT = 0x1  # derivation required a permutation without fixed points
FLAG_SEED = 0x2  # the payload starts with the reference code's integer seed
_KNOWN_FLAGS = FLAG_DERANGEMENT | FLAG_SEED

SECRET_SIZE = 32
MAX_BLOCK_SIZE = 128  # keeps permutation entries within u16
MAX_CHANNELS = 4
_MAX_ATTEMPTS = 10_000  # P(no derangement in 10k tries) ~ (1 - 1/e)**10000: never

_PERM_DOMAIN = b"keyedge/permutation/v1\x00"
_FP_DOMAIN = b"keyedge/fingerprint/v1\x00"


class _XofStream:
    """Reads little-endian u32 words from a SHAKE-256 output stream of unbounded length."""

    def __init__(self, material: bytes):
        self._xof = hashlib.shake_256(material)
        self._buf = b""
        self._pos = 0

    def u32(self) -> int:
        if self._pos + 4 > len(self._buf):  # SHAKE output is prefix-consistent: extend by recomputing longer
            self._buf = self._xof.digest(max(1024, 2 * len(self._buf)))
        (word,) = struct.unpack_from("<I", self._buf, self._pos)
        self._pos += 4
        return word


def _check_geometry(block_size: int, channels: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise KeyFileError(f"block size {block_size!r} is out of range", f"use an integer from 1 to {MAX_BLOCK_SIZE}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise KeyFileError(f"channel count {channels!r} is out of range", f"use 1 to {MAX_CHANNELS} (3 for RGB)")


def derive_permutation(secret: bytes, block_size: int, channels: int = 3, *, derangement: bool = True) -> np.ndarray:
    """Derive the block permutation ``v`` (length ``channels*block_size**2``) from ``secret``.

    Deterministic on every platform and Python/numpy version (see the module docstring).
    With ``derangement`` (the default) the result has no fixed point: every value moves.
    """
    _check_geometry(block_size, channels)
    n = channels * block_size * block_size
    if derangement and n < 2:
        raise KeyFileError(
            "a block of one value cannot be permuted without fixed points",
            "use a block size of 2 or more, or allow fixed points",
        )
    for attempt in range(_MAX_ATTEMPTS):
        stream = _XofStream(_PERM_DOMAIN + struct.pack("<HHI", block_size, channels, attempt) + bytes(secret))
        perm = list(range(n))
        for i in range(n - 1, 0, -1):
            bound = i + 1
            limit = (1 << 32) - ((1 << 32) % bound)
            word = stream.u32()
            while word >= limit:
                word = stream.u32()
            j = word % bound
            perm[i], perm[j] = perm[j], perm[i]
        arr = np.asarray(perm, dtype=np.int64)
        if not derangement or not np.any(arr == np.arange(n)):
            return arr
    raise AssertionError("unreachable: no derangement found")  # pragma: no cover


def fingerprint(permutation: Sequence[int] | np.ndarray, block_size: int, channels: int = 3) -> str:
    """Public identifier of a key's transform: 16 hex digits of a domain-separated SHA-256."""
    perm = np.asarray(permutation, dtype="<u2")
    digest = hashlib.sha256(_FP_DOMAIN + struct.pack("<HH", block_size, channels) + perm.tobytes()).hexdigest()
    return digest[:16]


def _validate_permutation(perm: np.ndarray, n: int) -> None:
    if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise KeyFileError(f"the permutation is not a permutation of 0..{n - 1}", "the key file is corrupted")


def read_container(data: bytes, name: str, not_key: str) -> tuple[int, int, int, int, int, bytes]:
    """Check a key file's envelope (magic, version, length, checksum); return its header fields and body.

    ``(version, block_size, channels, kind, flags, body)``, ``body`` being everything before the
    checksum (header and payload).  Shared by shuffle keys and sealing keys: one file format.
    """
    data = bytes(data)
    if not data:
        raise KeyFileError(f"{name} is empty", not_key)
    if not MAGIC.startswith(data[: len(MAGIC)]):
        raise KeyFileError(f"{name} is not a keyedge key file", not_key)
    if len(data) < HEADER_SIZE:
        raise KeyFileError(f"{name} is truncated ({len(data)} bytes)", "restore it from a backup")
    _, version, block_size, channels, kind, flags, length = _HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise KeyFileError(
            f"{name} uses key format version {version}, newer than this keyedge reads (up to {FORMAT_VERSION})",
            "upgrade keyedge",
        )
    if version < 1:
        raise KeyFileError(f"{name} has an invalid format version {version}", "the key file is corrupted")
    expected = HEADER_SIZE + length + CHECKSUM_SIZE
    if len(data) < expected:
        raise KeyFileError(f"{name} is truncated ({len(data)} of {expected} bytes)", "restore it from a backup")
    if len(data) > expected:
        raise KeyFileError(
            f"{name} has {len(data) - expected} unexpected trailing bytes",
            "the key file is corrupted; restore it from a backup",
        )
    body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
    if hashlib.sha256(body).digest() != checksum:
        raise KeyFileError(f"{name} failed its integrity check", "the key file is corrupted; restore it from a backup")
    return version, block_size, channels, kind, flags, body


def pack_container(block_size: int, channels: int, kind: int, flags: int, payload: bytes) -> bytes:
    """A key file's bytes: header, payload, SHA-256 checksum (``docs/key-format.md``)."""
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, block_size, channels, kind, flags, len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def raw_key_payload(data: bytes, name: str, kind: int, hint: str, size: int = 32) -> bytes:
    """The ``size``-byte payload of a key file of ``kind`` 3-5 (no block geometry), or one :class:`KeyFileError`."""
    _, block_size, channels, found, flags, body = read_container(data, name, hint)
    if found != kind:
        what = KIND_NAMES.get(found, f"of unknown kind {found}")
        raise KeyFileError(f"{name} is {what}, not {KIND_NAMES[kind]}", hint)
    payload = body[HEADER_SIZE:]
    if block_size or channels or flags or len(payload) != size:
        raise KeyFileError(f"{name} has an invalid key payload", "the key file is invalid")
    return payload


def refuse_loose_permissions(path: Path, what: str) -> None:
    """Raise :class:`KeyFileError` when a private key file is readable or writable by group or others."""
    if insecure_permissions(path):
        raise KeyFileError(f"{what} {path} is readable or writable by others", f"restrict it first: chmod 600 {path}")


@dataclass(frozen=True, eq=False, repr=False)
class Key:
    """One secret key: block size, channels and the permutation of a block's values.

    ``repr()`` and ``str()`` show only the fingerprint: a key never leaks into logs.
    Use :meth:`generate`, :meth:`from_seed` or :func:`load_key` to make one.
    """

    block_size: int
    channels: int
    _permutation: np.ndarray = field(repr=False)
    kind: int = KIND_SECRET
    _secret: bytes | None = field(default=None, repr=False)
    seed: int | None = field(default=None, repr=False)
    derangement: bool = True

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def generate(cls, block_size: int, channels: int = 3, *, derangement: bool = True) -> Key:
        """A fresh key from 256 bits of OS randomness."""
        secret = secrets.token_bytes(SECRET_SIZE)
        return cls.from_secret(secret, block_size, channels, derangement=derangement)

    @classmethod
    def from_secret(cls, secret: bytes, block_size: int, channels: int = 3, *, derangement: bool = True) -> Key:
        if len(secret) != SECRET_SIZE:
            raise KeyFileError(f"a secret must be {SECRET_SIZE} bytes, got {len(secret)}")
        perm = derive_permutation(secret, block_size, channels, derangement=derangement)
        return cls(block_size, channels, perm, KIND_SECRET, bytes(secret), None, derangement)

    @classmethod
    def from_permutation(
        cls, permutation: Sequence[int], block_size: int, channels: int = 3, *, seed: int | None = None
    ) -> Key:
        """A key holding an explicit permutation (e.g. one used by other code)."""
        _check_geometry(block_size, channels)
        perm = np.asarray(permutation, dtype=np.int64)
        _validate_permutation(perm, channels * block_size * block_size)
        if seed is not None and not 0 <= seed < 2**64:
            raise KeyFileError(f"seed {seed} is out of range", "use an integer from 0 to 2**64-1")
        return cls(block_size, channels, perm, KIND_PERMUTATION, None, seed, False)

    @classmethod
    def from_seed(cls, seed: int, block_size: int) -> Key:
        """Import a key of the authors' reference code: ``torch.manual_seed(seed); torch.randperm(3*P*P)``.

        The permutation is computed once, here, and stored explicitly in the key file,
        so the key no longer depends on torch's random number generator.
        """
        if not 0 <= seed < 2**64:
            raise KeyFileError(f"seed {seed} is out of range", "use an integer from 0 to 2**64-1")
        _check_geometry(block_size, 3)
        import torch  # only this legacy path needs torch

        generator = torch.Generator().manual_seed(seed)  # same stream as the global generator after manual_seed
        perm = torch.randperm(3 * block_size * block_size, generator=generator).numpy()
        return cls.from_permutation(perm, block_size, 3, seed=seed)

    # ---- properties ---------------------------------------------------------------------
    @property
    def permutation(self) -> np.ndarray:
        """The secret permutation ``v`` (a copy): ``block'[k] = block[v[k]]``."""
        return self._permutation.copy()

    @property
    def size(self) -> int:
        """Number of values in one block, ``C*P*P``."""
        return self.channels * self.block_size * self.block_size

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._permutation, self.block_size, self.channels)

    @property
    def fixed_points(self) -> int:
        return int(np.count_nonzero(self._permutation == np.arange(self.size)))

    @property
    def moved_fraction(self) -> float:
        """Fraction of a block's positions whose value the key moves (1.0 for a derangement)."""
        return 1.0 - self.fixed_points / self.size

    @property
    def source(self) -> str:
        if self.kind == KIND_SECRET:
            return "secret"
        return "reference-seed" if self.seed is not None else "permutation"

    @property
    def key_space_bits(self) -> float:
        """log2 of the number of keys an attacker must consider, for keys made like this one."""
        n = self.size
        bits = math.lgamma(n + 1) / math.log(2)  # log2(n!)
        if self.derangement and n > 1:
            bits -= math.log2(math.e)  # derangements: ~ n!/e
        if self.kind == KIND_SECRET:
            bits = min(bits, 8 * SECRET_SIZE)
        elif self.seed is not None:
            bits = min(bits, 64.0)  # at most a 64-bit seed; real seeds are often far smaller
        return max(bits, 0.0)

    def __repr__(self) -> str:
        return f"Key(block_size={self.block_size}, channels={self.channels}, fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def describe(self, *, reveal: bool = False) -> dict:
        """What ``keyedge key show`` prints; the permutation only with ``reveal``."""
        info = {
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "channels": self.channels,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "permutation_length": self.size,
            "fixed_points": self.fixed_points,
            "moved_fraction": round(self.moved_fraction, 6),
            "key_space_bits": round(self.key_space_bits, 1),
        }
        if reveal:
            info["permutation"] = [int(v) for v in self._permutation]
        return info

    # ---- serialization ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The key file's bytes (format in ``docs/key-format.md``)."""
        flags = 0
        if self.kind == KIND_SECRET:
            payload = bytes(self._secret or b"")
            flags |= FLAG_DERANGEMENT if self.derangement else 0
        else:
            payload = b""
            if self.seed is not None:
                flags |= FLAG_SEED
                payload += struct.pack("<Q", self.seed)
            payload += self._permutation.astype("<u2").tobytes()
        return pack_container(self.block_size, self.channels, self.kind, flags, payload)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "key file") -> Key:
        """Parse and validate a key file's bytes; any problem raises :class:`KeyFileError`."""
        not_key = "create one with `keyedge key new` or import a seed with `keyedge key import-seed`"
        _, block_size, channels, kind, flags, body = read_container(data, name, not_key)
        length = len(body) - HEADER_SIZE
        if kind == KIND_SEAL:
            raise KeyFileError(
                f"{name} is a sealing key, not a shuffle key", "pass it with --seal; shuffle keys come from keygen"
            )
        if kind in (KIND_SIGN, KIND_VERIFY):
            raise KeyFileError(
                f"{name} is a manifest signing key, not a shuffle key", "pass it with --sign-key or --verify-key"
            )
        # The checksum matches: anything odd below is a file written by broken or hostile software.
        try:
            _check_geometry(block_size, channels)
        except KeyFileError as exc:
            raise KeyFileError(f"{name}: {exc.message}", "the key file is invalid") from None
        if flags & ~_KNOWN_FLAGS:
            raise KeyFileError(f"{name} has unknown flags 0x{flags:x}", "upgrade keyedge or restore the key file")
        payload = body[HEADER_SIZE:]
        n = channels * block_size * block_size
        if kind == KIND_SECRET:
            if flags & FLAG_SEED or length != SECRET_SIZE:
                raise KeyFileError(f"{name} has an invalid secret payload", "the key file is invalid")
            derangement = bool(flags & FLAG_DERANGEMENT)
            if derangement and n < 2:
                raise KeyFileError(f"{name} asks for a derangement of a single value", "the key file is invalid")
            return cls.from_secret(payload, block_size, channels, derangement=derangement)
        if kind == KIND_PERMUTATION:
            seed_size = 8 if flags & FLAG_SEED else 0
            if flags & FLAG_DERANGEMENT or length != seed_size + 2 * n:
                raise KeyFileError(f"{name} has an invalid permutation payload", "the key file is invalid")
            seed = struct.unpack_from("<Q", payload)[0] if seed_size else None
            perm = np.frombuffer(payload, dtype="<u2", offset=seed_size).astype(np.int64)
            try:
                _validate_permutation(perm, n)
            except KeyFileError:
                raise KeyFileError(f"{name} holds an invalid permutation", "the key file is invalid") from None
            return cls(block_size, channels, perm, KIND_PERMUTATION, None, seed, False)
        raise KeyFileError(f"{name} has an unknown key kind {kind}", "upgrade keyedge or restore the key file")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the key file atomically, readable and writable by its owner only (0600)."""
        written = write_bytes_atomic(path, self.to_bytes(), mode=0o600, overwrite=overwrite)
        note_kept(written, "key file")
        return written


def load_key(path: str | os.PathLike) -> Key:
    """Read and validate a key file; every problem raises :class:`KeyFileError` with a fix."""
    path = Path(path)
    data = read_key_file(path, "key file", "check the path, or create one with `keyedge key new`")
    return Key.from_bytes(data, name=f"key file {path}")


def read_key_file(path: Path, what: str, missing_hint: str) -> bytes:
    """A key file's bytes (at most 1 MiB: no key is larger), or a one-line :class:`KeyFileError`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 20)
            if fh.read(1):
                raise KeyFileError(f"{what} {path} is far larger than any key file", "give the path of a key file")
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} not found", missing_hint) from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a directory", "give the path of a key file") from None
    except PermissionError:
        raise KeyFileError(f"{what} {path} is not readable", "check its permissions") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    return data


def insecure_permissions(path: str | os.PathLike) -> bool:
    """True when a key file is readable or writable by group or others (keys should be 0600)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(stat.S_IMODE(mode) & 0o077)


def load_keys(paths: Sequence[str | Path]) -> dict[str, Key]:
    """Keys by fingerprint, from key files and directories of key files (other files there are ignored)."""
    keys: dict[str, Key] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for candidate in sorted(p for p in path.iterdir() if p.is_file()):
                try:
                    key = load_key(candidate)
                except KeyFileError:
                    continue
                keys[key.fingerprint] = key
        else:
            key = load_key(path)
            keys[key.fingerprint] = key
    return keys


def key_for(fingerprint: str | None, keys: dict[str, Key], *, owner: object) -> Key | None:
    """The key with ``fingerprint`` among ``keys`` (None for a plain model); a one-line error naming ``owner``."""
    if fingerprint is None:
        return None
    if fingerprint not in keys:
        raise KeyFileError(
            f"no key with fingerprint {fingerprint} (the key of {owner}) among the given keys",
            "add its key file with --key-file or --keys DIR",
        )
    return keys[fingerprint]
