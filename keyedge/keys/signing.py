"""Signing keys: Ed25519 signatures over artifact manifests, so a device can refuse a swapped model.

A manifest's SHA-256 values authenticate nothing by themselves -- whoever swaps a model file can
update its hash too.  ``keyedge export --sign-key signer.key`` writes ``manifest.sig`` beside the
manifest: an Ed25519 signature (the ``cryptography`` package, extra ``seal``) over
``"keyedge/manifest-signature/v1\\0" || SHA-256(manifest.json's bytes)``.  The manifest lists every
file's SHA-256, so the signature covers every file; ``keyedge verify DIR --verify-key signer.pub``
and :func:`keyedge.runtime.open_artifact` (``verify_key=``) check it.

Key files use the container of :mod:`keyedge.keys.keyfile`: kind 4 holds the 32-byte private seed
(written 0600, refused when others can read it), kind 5 the 32-byte public key (shareable).  Both
are fingerprinted by the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from keyedge.deps import require
from keyedge.errors import OutputError, SealError
from keyedge.fileio import note_kept, write_bytes_atomic, write_new_files
from keyedge.keys.keyfile import (
    KIND_SIGN,
    KIND_VERIFY,
    pack_container,
    raw_key_payload,
    read_key_file,
    refuse_loose_permissions,
)

SIGNATURE_FILE = "manifest.sig"
SIGNATURE_SCHEMA = "keyedge-signature/1"
_DOMAIN = b"keyedge/manifest-signature/v1\x00"
#: checkpoints (``keyedge.json``) are signed in their own domain: a signature of one kind never passes for the other
CHECKPOINT_MANIFEST, CHECKPOINT_SIGNATURE = "keyedge.json", "keyedge.sig"
_DOMAINS = {
    "manifest.json": (_DOMAIN, SIGNATURE_FILE),
    CHECKPOINT_MANIFEST: (b"keyedge/checkpoint-signature/v1\x00", CHECKPOINT_SIGNATURE),
}
_FP_DOMAIN = b"keyedge/signkey/v1\x00"
_HINT = "create a pair with `keyedge signkey new --out signer.key` (it writes signer.pub too)"


def _ed25519():
    return require("cryptography.hazmat.primitives.asymmetric.ed25519", extra="seal")


def _fingerprint(public: bytes) -> str:
    return hashlib.sha256(_FP_DOMAIN + public).hexdigest()[:16]


@dataclass(frozen=True, eq=False, repr=False)
class VerifyKey:
    """An Ed25519 public key that checks manifest signatures; safe to share."""

    public: bytes

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.public)

    def to_bytes(self) -> bytes:
        return pack_container(0, 0, KIND_VERIFY, 0, self.public)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return write_bytes_atomic(path, self.to_bytes(), mode=0o644, overwrite=overwrite)

    def verify(self, signature: bytes, message: bytes, *, where: str) -> None:
        exc_type = require("cryptography.exceptions", extra="seal").InvalidSignature
        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except exc_type:
            raise SealError(
                f"{where}: the signature does not match (a file or the manifest was changed after signing)",
                "do not deploy this set; export and sign it again",
            ) from None

    def __repr__(self) -> str:
        return f"VerifyKey(fingerprint={self.fingerprint!r})"


@dataclass(frozen=True, eq=False, repr=False)
class SigningKey:
    """An Ed25519 private key that signs artifact manifests.  ``repr()`` shows only the fingerprint."""

    _seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        private = _ed25519().Ed25519PrivateKey.generate()
        raw = require("cryptography.hazmat.primitives.serialization", extra="seal")
        return cls(private.private_bytes(raw.Encoding.Raw, raw.PrivateFormat.Raw, raw.NoEncryption()))

    def _private(self):
        return _ed25519().Ed25519PrivateKey.from_private_bytes(self._seed)

    def verify_key(self) -> VerifyKey:
        raw = require("cryptography.hazmat.primitives.serialization", extra="seal")
        return VerifyKey(self._private().public_key().public_bytes(raw.Encoding.Raw, raw.PublicFormat.Raw))

    @property
    def fingerprint(self) -> str:
        return self.verify_key().fingerprint

    def sign(self, message: bytes) -> bytes:
        return self._private().sign(message)

    def to_bytes(self) -> bytes:
        return pack_container(0, 0, KIND_SIGN, 0, self._seed)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return write_bytes_atomic(path, self.to_bytes(), mode=0o600, overwrite=overwrite)

    def save_pair(self, path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write the signing key (0600) at ``path`` and its verify key beside it as ``.pub``: both or neither.

        Each name is created exclusively (unless ``overwrite``), so two processes creating the same
        pair cannot both succeed, and a lost race or an error leaves neither file behind.
        """
        path = Path(path)
        if path.suffix == ".pub":
            raise OutputError(
                f"{path} ends in .pub, the name of the verify key written beside the signing key",
                "name the signing key e.g. signer.key (signer.pub is written beside it)",
            )
        public = path.with_suffix(".pub")
        files = [(path, self.to_bytes(), 0o600), (public, self.verify_key().to_bytes(), 0o644)]
        written = write_new_files(files, overwrite=overwrite)
        note_kept(written[0], "signing key")
        note_kept(written[1], "verify key")
        return written[0], written[1]

    def __repr__(self) -> str:
        return f"SigningKey(fingerprint={self.fingerprint!r})"


def load_signing_key(path: str | os.PathLike) -> SigningKey:
    """Read a signing key file; refused when missing, invalid, or readable by group or others."""
    path = Path(path)
    data = read_key_file(path, "signing key file", _HINT)
    key = SigningKey(raw_key_payload(data, f"signing key file {path}", KIND_SIGN, _HINT))
    refuse_loose_permissions(path, "signing key file")
    return key


def load_verify_key(path: str | os.PathLike) -> VerifyKey:
    """Read a verify (public) key file."""
    path = Path(path)
    data = read_key_file(path, "verify key file", _HINT)
    return VerifyKey(raw_key_payload(data, f"verify key file {path}", KIND_VERIFY, _HINT))


# ---- manifest signatures ---------------------------------------------------------------------------------------------


def _message(manifest_bytes: bytes, name: str = "manifest.json") -> bytes:
    return _DOMAINS[name][0] + hashlib.sha256(manifest_bytes).digest()


def sign_manifest(directory: Path, key: SigningKey, name: str = "manifest.json") -> Path:
    """Write the signature of ``directory/name`` beside it: ``manifest.sig`` for an artifact set's
    ``manifest.json``, ``keyedge.sig`` for a checkpoint's ``keyedge.json``."""
    manifest = (Path(directory) / name).read_bytes()
    record = {
        "schema": SIGNATURE_SCHEMA,
        "algorithm": "Ed25519",
        "signer": key.fingerprint,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signature": base64.b64encode(key.sign(_message(manifest, name))).decode(),
    }
    text = (json.dumps(record, indent=2) + "\n").encode()
    return write_bytes_atomic(Path(directory) / _DOMAINS[name][1], text, overwrite=True)


def check_signature(directory: Path, key: VerifyKey, name: str = "manifest.json") -> str:
    """Raise :class:`SealError` unless ``directory/name`` carries a valid signature by ``key``; the signer."""
    directory = Path(directory)
    signature_file = _DOMAINS[name][1]
    where = str(directory / signature_file)
    try:
        record = json.loads((directory / signature_file).read_text())
        signer, signature = record["signer"], base64.b64decode(record["signature"], validate=True)
        if record.get("schema") != SIGNATURE_SCHEMA or not isinstance(signer, str):
            raise ValueError
    except FileNotFoundError:
        how = "train it with --sign-key" if name == CHECKPOINT_MANIFEST else "export it with --sign-key"
        raise SealError(f"{directory} is not signed (no {signature_file})", how) from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise SealError(f"{where} is not a keyedge signature file", "export and sign the set again") from None
    if signer != key.fingerprint:
        raise SealError(f"{directory} was signed by {signer}, not by {key.fingerprint}", "pass the signer's verify key")
    key.verify(signature, _message((directory / name).read_bytes(), name), where=where)
    return signer
