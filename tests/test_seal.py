"""Sealed artifacts: sealing keys, AES-256-GCM sealed files, no plaintext on disk, loading from memory, refusals."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_export import clean_error, cli, make_checkpoint

from keyedge.checkpoints import load_checkpoint
from keyedge.defenses.keyed import SHUFFLE_FORMS
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.export import ExportRequest, ExportSettings, deployable, export_one
from keyedge.deploy.runtime import open_artifact, open_sealed
from keyedge.errors import KeyFileError, OutputError, SealError
from keyedge.exporters import get_backend
from keyedge.exporters.template import module_tensors
from keyedge.fileio import MemoryFiles, memory_files_supported
from keyedge.keys.keyfile import Key, load_key
from keyedge.keys.seal import SealKey, load_sealkey

pytest.importorskip("cryptography")
pytestmark = pytest.mark.skipif(not memory_files_supported()[0], reason="sealed export needs Linux memfd")

TARGETS = ["onnx", "openvino"]
PLAINTEXT_MARKS = (b"<?xml", b"<net ")  # OpenVINO IR; ONNX files are found by the key's indices and weights


def _index_bytes(checkpoint: Path, key: Key) -> list[bytes]:
    """What an artifact may store in the clear, whichever shuffle form --fuse fastest picks on this host: the
    key's gather indices (int64, or int32 if a converter narrows them), the conv form's 0/1 selection weight
    (float32 or float16), and the first layer's float32 weights."""
    model, _ = load_checkpoint(checkpoint, key)
    marks = []
    for form in SHUFFLE_FORMS:
        tensors = module_tensors(deployable(model, key, form).module)
        shuffle = next(value for name, value in tensors.items() if name.startswith("shuffle."))
        if shuffle.dtype.kind in "iu":
            marks += [shuffle[:32].astype("<i8").tobytes(), shuffle[:32].astype("<i4").tobytes()]
        else:  # a 0/1 matrix: only the whole of it is specific to the key
            marks += [shuffle.astype("<f4").tobytes(), shuffle.astype("<f2").tobytes()]
    weights = tensors["backbone.conv1.weight"].reshape(-1)[:16].astype("<f4").tobytes()
    return [*marks, weights]


def _plaintext_in(roots: list[Path], marks: list[bytes]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {mark[:12]!r}" for mark in marks if mark in data]
    return found


@pytest.fixture(scope="module")
def sealed_set(tmp_path_factory):
    """One checkpoint, a sealing key, its sealed and its plain ONNX + OpenVINO sets; the key's index bytes."""
    root = tmp_path_factory.mktemp("seal")
    key = Key.from_secret(bytes(range(32)), 4)
    checkpoint = make_checkpoint(root / "ckpt", "resnet18", key)
    sealkey = SealKey.generate()
    sealkey_path = sealkey.save(root / "device.seal")
    scratch = root / "tmp"
    scratch.mkdir()
    marks = _index_bytes(checkpoint, key)
    seen_during: list[str] = []
    scans: list[str] = []
    original = {name: type(get_backend(name)).inspect for name in TARGETS}
    loads = {name: type(get_backend(name)).load for name in TARGETS}

    def scan() -> None:
        seen_during.extend(_plaintext_in([root / "sealed", scratch], [*marks, *PLAINTEXT_MARKS]))

    def scanning(name):
        def inspect(self, path):  # runs while the artifact exists (in memory) and before it is sealed
            scans.append(name)
            scan()
            return original[name](self, path)

        return inspect

    def scanning_loads(name):
        def load(self, path, **kw):  # also each of --fuse fastest's trial artifacts, while it exists
            scan()
            return loads[name](self, path, **kw)

        return load

    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(scratch)  # every temporary file of the export lands where the scan looks
    try:
        for name in TARGETS:
            type(get_backend(name)).inspect = scanning(name)
            type(get_backend(name)).load = scanning_loads(name)
        # fastest: every form exported and timed first -- in memory too
        settings = ExportSettings(targets=TARGETS, out=root / "sealed", seal=sealkey, fuse="fastest")
        sealed = export_one(ExportRequest(checkpoint, key), settings)
    finally:
        tempfile.tempdir = old_tempdir
        for name in TARGETS:
            type(get_backend(name)).inspect = original[name]
            type(get_backend(name)).load = loads[name]
    fuse = {t: r.fuse for t, r in ArtifactManifest.read(sealed).targets.items()}
    by_form = {}
    for form in sorted(set(fuse.values())):  # the same forms, unsealed: what the sealed set must run like
        out = root / f"plain-{form}"
        by_form[form] = export_one(ExportRequest(checkpoint, key), ExportSettings(targets=TARGETS, out=out, fuse=form))
    plains = {target: by_form[form] for target, form in fuse.items()}
    return {
        "root": root,
        "key": key,
        "checkpoint": checkpoint,
        "sealkey": sealkey,
        "sealkey_path": sealkey_path,
        "sealed": sealed,
        "plain": plains["onnx"],
        "plains": plains,  # per target: the unsealed set of the form the sealed one chose
        "marks": marks,
        "scratch": scratch,
        "seen_during": seen_during,
        "scans": scans,
    }


def _copy(directory: Path, where: Path) -> Path:
    target = where / directory.name
    shutil.copytree(directory, target)
    return target


# ---- sealing keys ------------------------------------------------------------------------------------------------


def test_sealing_key_file_round_trip_mode_and_kinds(tmp_path):
    key = SealKey.generate()
    path = key.save(tmp_path / "device.seal")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_sealkey(path) == key and load_sealkey(path).fingerprint == key.fingerprint
    assert key._secret.hex() not in repr(key) and key.fingerprint in repr(key)
    assert SealKey.generate() != key
    Key.generate(4).save(tmp_path / "k1.bin")
    with pytest.raises(KeyFileError, match="is a shuffle key, not a sealing key"):
        load_sealkey(tmp_path / "k1.bin")
    with pytest.raises(KeyFileError, match="is a sealing key, not a shuffle key"):
        load_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"readable or writable by others.*chmod 600"):
        load_sealkey(path)


def test_sealkey_cli_never_prints_the_key(tmp_path):
    result = cli("sealkey", "new", "--out", tmp_path / "d.seal")
    assert result.exit_code == 0, result.output
    key = load_sealkey(tmp_path / "d.seal")
    shown = cli("sealkey", "show", tmp_path / "d.seal", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["fingerprint"] == key.fingerprint
    for output in (result.output, shown.output):
        assert key._secret.hex() not in output and key.fingerprint in output
    clean_error(cli("sealkey", "new", "--out", tmp_path / "d.seal"), "already exists")
    os.chmod(tmp_path / "d.seal", 0o640)
    clean_error(cli("sealkey", "show", tmp_path / "d.seal"), "readable or writable by others")


# ---- export -------------------------------------------------------------------------------------------------------


def test_sealed_set_holds_only_sealed_files_and_no_key(sealed_set):
    sealed = sealed_set["sealed"]
    assert sorted(p.name for p in sealed.iterdir()) == [
        "manifest.json",
        "model.bin.sealed",
        "model.onnx.sealed",
        "model.xml.sealed",
    ]
    manifest = json.loads((sealed / "manifest.json").read_text())
    assert manifest["seal"]["sealkey"] == sealed_set["sealkey"].fingerprint
    assert manifest["seal"]["cipher"] == "AES-256-GCM"
    assert all(t["parity"]["passed"] and t["parity"]["ran"] for t in manifest["targets"].values())
    for target in TARGETS:  # --fuse fastest timed every form, in memory (the scans below look for them on disk)
        choice = manifest["targets"][target]["form_choice"]
        assert choice["measured"] and set(choice["timed"]) == set(SHUFFLE_FORMS), choice
    text = (sealed / "manifest.json").read_text()
    assert sealed_set["sealkey"]._secret.hex() not in text
    assert " ".join(map(str, sealed_set["key"].permutation[:16])) not in text


def test_no_plaintext_on_disk_during_or_after_a_sealed_export(sealed_set):
    marks = [*sealed_set["marks"], *PLAINTEXT_MARKS]
    roots = [sealed_set["sealed"], sealed_set["scratch"]]
    assert sealed_set["scans"] == TARGETS and sealed_set["seen_during"] == []  # scanned while each artifact existed
    assert _plaintext_in(roots, marks) == []
    assert list(sealed_set["scratch"].iterdir()) == []  # the in-memory files' links are gone too
    # the scan would find them: the plain export of the same checkpoint holds the key's indices in the clear
    assert _plaintext_in([sealed_set["plain"]], sealed_set["marks"])


def test_sealed_artifacts_run_like_the_plain_ones(sealed_set):
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    for target in TARGETS:
        with open_artifact(sealed_set["plains"][target], target) as plain:
            expected = plain.predict(x)
        with open_sealed(sealed_set["sealed"], sealed_set["sealkey_path"], target=target) as runner:
            assert runner.path.name.endswith(".sealed")
            got = runner.predict(x)
        np.testing.assert_array_equal(got, expected)  # the same model, loaded from memory
    with open_sealed(sealed_set["sealed"] / "model.xml.sealed", sealed_set["sealkey"]) as runner:
        assert runner.backend == "openvino"


def test_sealed_export_refusals_leave_nothing(sealed_set, tmp_path):
    ck, sealkey = sealed_set["checkpoint"], sealed_set["sealkey_path"]
    key_file = sealed_set["key"].save(tmp_path / "k1.bin")
    out = tmp_path / "out"
    for target in ("coreml", "all"):
        clean_error(
            cli("export", "-c", ck, "-k", key_file, "-t", target, "--seal", sealkey, "-o", out), "does not seal coreml"
        )
    clean_error(
        cli("export", "-c", ck, "-k", key_file, "--seal", key_file, "-o", out), "is a shuffle key, not a sealing"
    )
    assert not out.exists()


# ---- opening: every refusal one line ---------------------------------------------------------------------------------


def test_wrong_missing_and_tampered(sealed_set, tmp_path):
    sealed = _copy(sealed_set["sealed"], tmp_path)
    with pytest.raises(SealError, match=r"is sealed .*pass the device's sealing key"):
        open_artifact(sealed, "onnx")
    with pytest.raises(SealError, match=f"sealed with sealing key {sealed_set['sealkey'].fingerprint}"):
        open_artifact(sealed, "onnx", sealkey=SealKey.generate())
    # flip one ciphertext byte
    blob = bytearray((sealed / "model.onnx.sealed").read_bytes())
    blob[len(blob) // 2] ^= 1
    (sealed / "model.onnx.sealed").write_bytes(bytes(blob))
    with pytest.raises(SealError, match="failed its integrity check"):
        open_artifact(sealed, "onnx", sealkey=sealed_set["sealkey"])
    # swap the IR's two files
    xml, weights = sealed / "model.xml.sealed", sealed / "model.bin.sealed"
    a, b = xml.read_bytes(), weights.read_bytes()
    xml.write_bytes(b)
    weights.write_bytes(a)
    with pytest.raises(SealError, match="failed its integrity check"):
        open_artifact(sealed, "openvino", sealkey=sealed_set["sealkey"])


def test_edited_manifest_and_files_moved_between_sets(sealed_set, tmp_path):
    edited = _copy(sealed_set["sealed"], tmp_path / "a")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["checkpoint"]["test_accuracy"] = 0.99
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(SealError, match=r"does not belong to this artifact set, or its manifest\.json was edited"):
        open_artifact(edited, "onnx", sealkey=sealed_set["sealkey"])
    # a second sealed export of the same checkpoint with the same sealing key is another set
    other = export_one(
        ExportRequest(sealed_set["checkpoint"], sealed_set["key"]),
        ExportSettings(targets=["onnx"], out=tmp_path / "b", seal=sealed_set["sealkey"], real_inputs=0),
    )
    shutil.copy(sealed_set["sealed"] / "model.onnx.sealed", other / "model.onnx.sealed")
    with pytest.raises(SealError, match="does not belong to this artifact set"):
        open_artifact(other, "onnx", sealkey=sealed_set["sealkey"])
    # whitespace and key order are not edits
    same = _copy(sealed_set["sealed"], tmp_path / "c")
    data = json.loads((same / "manifest.json").read_text())
    (same / "manifest.json").write_text(json.dumps(dict(reversed(list(data.items())))))
    with open_artifact(same, "onnx", sealkey=sealed_set["sealkey"]) as runner:
        assert runner.input_shape == [1, 3, 32, 32]


def test_bench_latency_and_its_refusals_on_a_sealed_set(sealed_set, tmp_path):
    sealed, sealkey = sealed_set["sealed"], sealed_set["sealkey_path"]
    fast = ["--min-seconds", "0", "--min-iterations", "2", "--rounds", "1", "--warmup", "0", "--no-progress"]
    result = cli("bench", "latency", sealed, "--seal", sealkey, "--json", tmp_path / "lat.json", *fast)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lat.json").read_text())
    timed = {m["artifact"]["target"] for m in report["measurements"] if m["artifact"]["path"].endswith(".sealed")}
    assert {"onnx", "openvino"} <= timed
    assert sealed_set["sealkey"]._secret.hex() not in (tmp_path / "lat.json").read_text()
    clean_error(cli("bench", "latency", sealed, *fast), "is sealed", "--seal")
    other = SealKey.generate().save(tmp_path / "other.seal")
    clean_error(cli("bench", "latency", sealed, "--seal", other, *fast), "is sealed with sealing key")
    os.chmod(sealkey, 0o644)
    try:
        clean_error(cli("bench", "latency", sealed, "--seal", sealkey, *fast), "readable or writable by others")
    finally:
        os.chmod(sealkey, 0o600)


def test_bench_robustness_refuses_a_sealed_set_without_its_key_before_any_attack(sealed_set, tmp_path):
    """Issue 33: it ran every attack first and refused at the end; now it is refused before the first one."""
    key_file = sealed_set["key"].save(tmp_path / "k.bin")
    base = ["bench", "robustness", sealed_set["checkpoint"], "-k", key_file, "-o", tmp_path / "rep"]
    other = SealKey.generate().save(tmp_path / "o.seal")
    for extra, fragment in (([], "is sealed"), (["--seal", other], "sealed with")):
        started = time.perf_counter()
        clean_error(cli(*base, "--artifacts", sealed_set["sealed"], *extra), fragment)
        assert time.perf_counter() - started < 30, "refused only after the attacks ran"
        assert not (tmp_path / "rep").exists()


# ---- in-memory files ------------------------------------------------------------------------------------------------


def test_memory_files_stay_off_disk_and_refuse_a_bypass(tmp_path):
    with MemoryFiles(["model.xml", "model.bin"]) as memory:
        directory = memory.directory
        memory.path("model.xml").write_bytes(b"<?xml secret")
        assert memory.read("model.xml") == b"<?xml secret" and memory.read("model.bin") == b""
        assert all(p.is_symlink() for p in directory.iterdir())
        memory.path("model.bin").unlink()  # a converter that writes a temporary file and renames it
        memory.path("model.bin").write_bytes(b"weights")
        with pytest.raises(OutputError, match=r"replaced model\.bin with a file on disk"):
            memory.read("model.bin")
        assert not memory.path("model.bin").exists()
    assert not directory.exists()


def test_links_left_by_a_killed_process_are_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "keyedge-memory-999999999-abc"  # no such PID
    dead.mkdir()
    os.symlink("/proc/999999999/fd/5", dead / "model.onnx")
    alive = tmp_path / f"keyedge-memory-{os.getppid()}-abc"
    alive.mkdir()
    with MemoryFiles(["model.onnx"]) as memory:
        assert memory.directory.parent == tmp_path
    assert not dead.exists() and alive.exists()


def test_killed_sealed_export_leaves_no_plaintext(sealed_set, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    key_file = sealed_set["key"].save(tmp_path / "k1.bin")
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "keyedge", "export", "-c", sealed_set["checkpoint"], "-k", key_file]
    cmd += ["-t", "onnx", "-t", "openvino", "--seal", sealed_set["sealkey_path"], "-o", out]
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(scratch.glob("keyedge-memory-*/model.xml")):
        time.sleep(0.02)
    assert list(scratch.glob("keyedge-memory-*/model.xml")), "the export never reached OpenVINO"
    proc.send_signal(signal.SIGKILL)  # the ONNX artifact is verified and held in memory by now
    proc.wait(timeout=30)
    marks = [*sealed_set["marks"], *PLAINTEXT_MARKS]
    assert _plaintext_in([out, scratch], marks) == []
    assert not any(p.name.endswith(".sealed") for p in out.rglob("*"))  # sealing comes after every target verified
    result = cli(
        "export", "-c", sealed_set["checkpoint"], "-k", key_file, "--seal", sealed_set["sealkey_path"], "-o", out
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == [sealed_set["sealed"].name]


# ---- signed manifests and `keyedge verify` ----------------------------------------------------------------------


def test_signed_set_verifies_and_a_swapped_model_is_refused(sealed_set, tmp_path):
    from keyedge.deploy.verify import verify_set
    from keyedge.fileio import sha256_file
    from keyedge.keys.signing import SigningKey, load_signing_key, load_verify_key

    result = cli("signkey", "new", "--out", tmp_path / "signer.key")
    assert result.exit_code == 0, result.output
    signer, public = load_signing_key(tmp_path / "signer.key"), load_verify_key(tmp_path / "signer.pub")
    assert signer._seed.hex() not in result.output and signer.fingerprint == public.fingerprint
    directory = export_one(
        ExportRequest(sealed_set["checkpoint"], sealed_set["key"]),
        ExportSettings(targets=TARGETS, out=tmp_path / "out", sign=signer, real_inputs=0),
    )
    checked = verify_set(directory, verify_key=public, key=sealed_set["key"])
    assert checked["files"] == 3 and checked["signed_by"] == signer.fingerprint
    assert all(checked["parity"][t]["passed"] for t in TARGETS)
    key_file = sealed_set["key"].save(tmp_path / "k1.bin")
    ok = cli("verify", directory, "--verify-key", tmp_path / "signer.pub", "-k", key_file)
    assert ok.exit_code == 0 and "signature valid" in ok.stdout and "onnx parity" in ok.stdout, ok.output
    assert "not in the manifest" not in ok.stdout  # every file keyedge writes is listed
    # issue 33: a file added to a signed set is covered by nothing: refused with a verify key, reported without
    extra = _copy(directory, tmp_path / "extra")
    (extra / "model.onnx.data").write_bytes(b"external weights a loader might read")
    clean_error(cli("verify", extra, "--verify-key", tmp_path / "signer.pub"), "does not list", "model.onnx.data")
    said = cli("verify", extra)
    assert said.exit_code == 0 and "1 file(s) not in the manifest: model.onnx.data" in said.stdout, said.output
    # an unsigned set, another signer
    clean_error(cli("verify", sealed_set["plain"], "--verify-key", tmp_path / "signer.pub"), "is not signed")
    SigningKey.generate().verify_key().save(tmp_path / "other.pub")
    clean_error(cli("verify", directory, "--verify-key", tmp_path / "other.pub"), f"signed by {signer.fingerprint}")
    # swap the model (a plain model of the same architecture) and fix up its hash in the manifest
    other = export_one(
        ExportRequest(make_checkpoint(tmp_path / "plain-ckpt", "resnet18"), None),
        ExportSettings(targets=["onnx"], out=tmp_path / "other", real_inputs=0),
    )
    swapped = _copy(directory, tmp_path / "swapped")
    shutil.copy(other / "model.onnx", swapped / "model.onnx")
    clean_error(cli("verify", swapped), "does not match its SHA-256")
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["targets"]["onnx"]["files"][0]["sha256"] = sha256_file(swapped / "model.onnx")
    (swapped / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert cli("verify", swapped).exit_code == 0  # hashes alone authenticate nothing...
    clean_error(cli("verify", swapped, "--verify-key", tmp_path / "signer.pub"), "the signature does not match")
    with pytest.raises(SealError, match="the signature does not match"):  # ...the signature does, in the loader too
        open_artifact(swapped, "onnx", verify_key=public)
    with open_artifact(directory, "onnx", verify_key=tmp_path / "signer.pub") as runner:
        assert runner.backend == "onnx"
