"""Sealing keys and sealed files: an artifact encrypted at rest, decrypted only into memory (docs/sealed-format.md).

An exported artifact embeds its shuffle key (gather indices or folded weights): whoever copies it
off a device can attack that device's model white-box.  ``keyedge export --seal SEALKEY`` therefore
writes each model file as a *sealed file*: AES-256-GCM (the ``cryptography`` package, extra
``seal``) under a device sealing key, a fresh 96-bit random nonce per file, and as associated data
the file's header -- which carries the sealing key's fingerprint and the *binding*, a digest of the
artifact set's manifest -- plus the file's plaintext name.  So a sealed file opens only with its
sealing key, inside the artifact set it was written for, under its own name, with that set's
manifest unedited; anything else fails one check with one line.

A sealing key is its own kind of key file (the shuffle-key container of :mod:`keyedge.keys.keyfile`,
kind 3, 32 random bytes), written 0600 and refused when group or others can read it.  Its
fingerprint is a hash of the secret: it names the key and reveals nothing usable about it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

from keyedge.deps import require
from keyedge.errors import SealError
from keyedge.fileio import write_bytes_atomic
from keyedge.keys.keyfile import (
    FORMAT_VERSION,
    KIND_SEAL,
    pack_container,
    raw_key_payload,
    read_key_file,
    refuse_loose_permissions,
)

SEALKEY_SIZE = 32  # AES-256
SEALED_SUFFIX = ".sealed"
SEALED_FORMAT = "keyedge-sealed/1"
CIPHER = "AES-256-GCM"
MAGIC = b"KEYSEAL\x00"
VERSION = 1
#: magic, version, flags, sealing-key fingerprint (8 raw bytes), binding (SHA-256), nonce
_HEADER = struct.Struct("<8sHH8s32s12s")
HEADER_SIZE = _HEADER.size  # 64
TAG_SIZE = 16
_FP_DOMAIN = b"keyedge/sealkey/v1\x00"
_NOT_SEALKEY = "create one with `keyedge sealkey new --out FILE`"


def _aead():
    return require("cryptography.hazmat.primitives.ciphers.aead", extra="seal").AESGCM


@dataclass(frozen=True, eq=False, repr=False)
class SealKey:
    """A device's sealing key: 256 random bits.  ``repr()`` shows only the fingerprint."""

    _secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> SealKey:
        return cls(secrets.token_bytes(SEALKEY_SIZE))

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over a domain tag and the secret."""
        return hashlib.sha256(_FP_DOMAIN + self._secret).hexdigest()[:16]

    def to_bytes(self) -> bytes:
        return pack_container(0, 0, KIND_SEAL, 0, self._secret)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "sealing key file") -> SealKey:
        return cls(raw_key_payload(data, name, KIND_SEAL, "pass a sealing key: `keyedge sealkey new`", SEALKEY_SIZE))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the sealing key atomically, readable and writable by its owner only (0600)."""
        return write_bytes_atomic(path, self.to_bytes(), mode=0o600, overwrite=overwrite)

    def describe(self) -> dict:
        """What ``keyedge sealkey show`` prints (never the secret)."""
        return {
            "kind": "sealing key",
            "format_version": FORMAT_VERSION,
            "cipher": CIPHER,
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"SealKey(fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SealKey) and secrets.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def load_sealkey(path: str | os.PathLike) -> SealKey:
    """Read a sealing key file; refused (one line) when missing, invalid, or readable by group or others."""
    path = Path(path)
    data = read_key_file(path, "sealing key file", _NOT_SEALKEY)
    key = SealKey.from_bytes(data, name=f"sealing key file {path}")
    refuse_loose_permissions(path, "sealing key file")
    return key


def as_sealkey(value: SealKey | str | os.PathLike) -> SealKey:
    """A :class:`SealKey`, or the sealing key in the file ``value``."""
    return value if isinstance(value, SealKey) else load_sealkey(value)


# ---- sealed files -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedHeader:
    version: int
    sealkey: str  # fingerprint, hex
    binding: bytes
    nonce: bytes


def _aad(header: bytes, name: str) -> bytes:
    return header + b"\x00" + name.encode("utf-8")


def seal(plaintext: bytes, key: SealKey, binding: bytes, name: str) -> bytes:
    """``plaintext`` as a sealed file bound to ``binding`` (an artifact set's digest) and its file ``name``."""
    if len(binding) != 32:
        raise ValueError("the binding is a SHA-256 digest (32 bytes)")
    nonce = secrets.token_bytes(12)
    header = _HEADER.pack(MAGIC, VERSION, 0, bytes.fromhex(key.fingerprint), binding, nonce)
    return header + _aead()(key._secret).encrypt(nonce, bytes(plaintext), _aad(header, name))


def read_header(data: bytes, where: str) -> SealedHeader:
    """The header of a sealed file, or one :class:`SealError` saying why it is not one."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SealError(f"{where} is not a keyedge sealed file", "seal artifacts with `keyedge export --seal`")
    if len(data) < HEADER_SIZE + TAG_SIZE:
        raise SealError(f"{where} is truncated ({len(data)} bytes)", "copy the artifact set again")
    _, version, flags, fp, binding, nonce = _HEADER.unpack_from(data)
    if version > VERSION:
        raise SealError(f"{where} uses sealed format version {version}, newer than this keyedge", "upgrade keyedge")
    if version < 1 or flags:
        raise SealError(f"{where} has an invalid sealed-file header", "copy the artifact set again")
    return SealedHeader(version, fp.hex(), binding, nonce)


def unseal(data: bytes, key: SealKey, binding: bytes, name: str, *, where: str) -> bytes:
    """Decrypt a sealed file into memory; one :class:`SealError` for a wrong key, set, name or any tampering."""
    header = read_header(data, where)
    if header.sealkey != key.fingerprint:
        raise SealError(
            f"{where} was sealed with sealing key {header.sealkey}, not {key.fingerprint}",
            "pass the sealing key of the device it was exported for",
        )
    if not secrets.compare_digest(header.binding, binding):
        raise SealError(
            f"{where} does not belong to this artifact set, or its manifest.json was edited",
            "sealed files open only in the set they were exported with; export again",
        )
    exc_type = require("cryptography.exceptions", extra="seal").InvalidTag
    try:
        body = memoryview(data)[HEADER_SIZE:]  # no copy of the ciphertext
        return _aead()(key._secret).decrypt(header.nonce, body, _aad(bytes(data[:HEADER_SIZE]), name))
    except exc_type:
        raise SealError(
            f"{where} failed its integrity check: the file was tampered with, corrupted or renamed",
            "copy the artifact set again from its source, or export again",
        ) from None
