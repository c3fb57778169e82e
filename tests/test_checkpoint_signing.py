"""Signed checkpoints (issue 33): a checkpoint's SHA-256 values authenticate nothing -- whoever swaps the weights
can update their hash -- so ``train --sign-key`` signs every checkpoint it writes, and ``keyedge verify`` and
``load_checkpoint(..., verify_key=)`` refuse an unsigned, re-signed-by-another or tampered one."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from keyedge.checkpoints import load_checkpoint, verify_checkpoint
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.errors import SealError
from keyedge.fileio import sha256_file
from keyedge.keys.signing import SigningKey, load_signing_key, load_verify_key

pytest.importorskip("cryptography")
pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
runner = CliRunner()
TRAIN = ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", "none", "--image-size", "32",
         "--batch-size", "32", "--train-limit", "64", "--test-limit", "32"]  # fmt: skip


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and "Traceback" not in result.output, line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    assert _cli("signkey", "new", "-o", root / "signer.key").exit_code == 0
    assert _cli("key", "new", "-o", root / "k.bin").exit_code == 0
    result = _cli(*TRAIN, "--epochs", 1, "-k", root / "k.bin", "-o", root / "ckpt", "--sign-key", root / "signer.key")
    assert result.exit_code == 0, result.output
    return root


def test_a_signed_checkpoint_verifies_and_loads(signed):
    assert (signed / "ckpt" / "keyedge.sig").is_file()
    ok = _cli("verify", signed / "ckpt", "--verify-key", signed / "signer.pub")
    assert ok.exit_code == 0, ok.output
    signer = load_signing_key(signed / "signer.key").fingerprint
    assert f"checkpoint; 2 files match their SHA-256; signed by {signer} (signature valid)" in ok.stdout, ok.stdout
    from keyedge.keys.keyfile import load_key

    _model, manifest = load_checkpoint(signed / "ckpt", load_key(signed / "k.bin"), verify_key=signed / "signer.pub")
    assert manifest.epoch == 1
    secret = load_signing_key(signed / "signer.key")._seed.hex()
    assert secret not in (signed / "ckpt" / "keyedge.json").read_text() + ok.output


def test_swapped_weights_with_an_updated_hash_are_refused_with_a_verify_key(signed, tmp_path):
    """What issue 33 found: weights swapped, hash fixed up in keyedge.json -- loaded without complaint."""
    from keyedge.keys.keyfile import load_key

    ckpt = shutil.copytree(signed / "ckpt", tmp_path / "ckpt")
    weights = next(ckpt.glob("weights-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # a changed weight (the last byte of the tensor data)
    weights.write_bytes(bytes(data))
    manifest = json.loads((ckpt / "keyedge.json").read_text())
    manifest["files"]["weights"]["sha256"] = sha256_file(weights)
    (ckpt / "keyedge.json").write_text(json.dumps(manifest, indent=2))
    assert _cli("verify", ckpt).exit_code == 0  # the hashes agree: they authenticate nothing
    _one_line(_cli("verify", ckpt, "--verify-key", signed / "signer.pub"), "the signature does not match")
    with pytest.raises(SealError, match="the signature does not match"):
        load_checkpoint(ckpt, load_key(signed / "k.bin"), verify_key=load_verify_key(signed / "signer.pub"))


def test_unsigned_other_signer_and_extra_files_are_refused(signed, tmp_path):
    ckpt = shutil.copytree(signed / "ckpt", tmp_path / "ckpt")
    SigningKey.generate().verify_key().save(tmp_path / "other.pub")
    _one_line(_cli("verify", ckpt, "--verify-key", tmp_path / "other.pub"), "was signed by")
    (ckpt / "extra.safetensors").write_bytes(b"x")
    _one_line(_cli("verify", ckpt, "--verify-key", signed / "signer.pub"), "does not list", "extra.safetensors")
    (ckpt / "extra.safetensors").unlink()
    (ckpt / "keyedge.sig").unlink()
    _one_line(_cli("verify", ckpt, "--verify-key", signed / "signer.pub"), "is not signed", "--sign-key")
    with pytest.raises(SealError, match="is not signed"):
        verify_checkpoint(ckpt, verify_key=signed / "signer.pub")


def test_a_run_continued_without_the_signing_key_drops_the_stale_signature(signed, tmp_path):
    """The signature of epoch 1 must not stay beside epoch 2's manifest, passing for a signature it is not."""
    ckpt = shutil.copytree(signed / "ckpt", tmp_path / "ckpt")
    result = _cli(*TRAIN, "--epochs", 2, "-k", signed / "k.bin", "-o", ckpt, "--resume")
    assert result.exit_code == 0, result.output
    assert not (ckpt / "keyedge.sig").exists()
    resigned = _cli(*TRAIN, "--epochs", 3, "-k", signed / "k.bin", "-o", ckpt, "--resume",
                    "--sign-key", signed / "signer.key")  # fmt: skip
    assert resigned.exit_code == 0, resigned.output
    assert _cli("verify", ckpt, "--verify-key", signed / "signer.pub").exit_code == 0
