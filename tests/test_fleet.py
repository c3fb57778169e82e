"""``keyedge fleet`` (issue 14): a fleet of tiny keys end to end on a local Ray instance, retries and failures,
a killed driver, resumption that redoes nothing finished, one command per fleet at a time, no key material in any
manifest, and one-line errors for a hand-edited fleet.json (schema keyedge-fleet/1, docs/fleet.schema.json)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from keyedge.app.fleet import FleetManifest, fleet_lock, status_rows
from keyedge.checkpoints import verify_checkpoint
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.errors import KeyedgeError
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import load_key
from keyedge.keys.signing import SigningKey

needs_data = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
KEYEDGE = [sys.executable, "-m", "keyedge"]
DOCS = Path(__file__).resolve().parent.parent / "docs"
RECIPE = ["-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", "none", "--image-size", "32"]
RECIPE += ["--epochs", "1", "--batch-size", "32", "--test-limit", "32"]
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _init(directory: Path, devices: int = 3, train_limit: int = 64) -> Path:
    result = _cli("fleet", "init", directory, "-n", devices, *RECIPE, "--train-limit", train_limit)
    assert result.exit_code == 0, result.output
    return directory


def _secrets(directory: Path) -> list[str]:
    """Every way a device's key could leak into text: its secret in hex, its permutation as a list."""
    out = []
    for key_file in sorted((directory / "keys").glob("*.bin")):
        key = load_key(key_file)
        out.append(key._secret.hex())
        out.append(json.dumps([int(v) for v in key.permutation]))
        out.append(", ".join(str(int(v)) for v in key.permutation[:12]))
    return out


def _checkpoint_shas(directory: Path) -> dict[str, str]:
    return {p.parent.name: sha256_file(p) for p in sorted((directory / "runs").glob("*/keyedge.json"))}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@needs_data
@pytest.mark.slow
def test_fleet_end_to_end_on_local_ray(tmp_path, local_ray):
    fleet_dir = _init(tmp_path / "fleet")
    assert (fleet_dir / "keys" / "device-000.bin").stat().st_mode & 0o777 == 0o600
    signer, _ = SigningKey.generate().save_pair(tmp_path / "signer.key")  # checkpoints travel: sign them
    train = _cli("fleet", "train", fleet_dir, "--engine", "ray", "--sign-key", signer)
    assert train.exit_code == 0, train.output
    for run in sorted((fleet_dir / "runs").iterdir()):
        assert verify_checkpoint(run, verify_key=tmp_path / "signer.pub")["signed_by"] is not None
    assert "Ray (2 CPUs" in train.output and "fleet train: 3 done now, 0 already done" in train.output
    export = _cli("fleet", "export", fleet_dir, "--engine", "ray", "-t", "onnx")
    assert export.exit_code == 0 and "fleet export: 3 done now" in export.output, export.output
    verify = _cli("fleet", "verify", fleet_dir, "--engine", "ray")
    assert verify.exit_code == 0 and "fleet verify: 3 done now" in verify.output, verify.output
    report = _cli("fleet", "report", fleet_dir, "--engine", "ray")
    assert report.exit_code == 0, report.output

    fleet = FleetManifest.read(fleet_dir)
    for device in fleet.devices:  # the manifest maps name <-> fingerprint <-> checkpoint <-> artifacts
        assert load_key(fleet_dir / device.key_file).fingerprint == device.fingerprint
        assert device.trained["sha256"] == sha256_file(fleet_dir / device.checkpoint / "keyedge.json")
        artifacts = fleet_dir / device.exported["path"]
        assert json.loads((artifacts / "manifest.json").read_text())["fingerprint"] == device.fingerprint
        assert device.verified["sha256"] == sha256_file(artifacts / "manifest.json")
        assert device.exported["sources"] == {"onnx": "fleet-template"}
        assert 0.0 <= device.other_key["accuracy"] <= 1.0 and device.failed is None
    table = json.loads((fleet_dir / "report" / "fleet-report.json").read_text())
    rows = {row["device"]: row for row in table["devices"]}
    assert sorted(rows) == ["device-000", "device-001", "device-002"]
    for row in rows.values():
        assert row["artifacts"]["verified"] and row["artifacts"]["parity"]["onnx"] <= 1e-4
        assert row["keyed_over_plain"]["median"] > 0 and row["accuracy_other_key"] is not None
    markdown = (fleet_dir / "report" / "fleet-report.md").read_text()
    assert markdown.count("| device-0") == 3

    # nothing of any key in the manifests, the report or the logs
    texts = [p.read_text() for p in fleet_dir.rglob("*") if p.suffix in (".json", ".md", ".log")]
    texts += [train.output, export.output, verify.output, report.output]
    for secret in _secrets(fleet_dir):
        assert not any(secret in text for text in texts)

    # everything is current: a rerun of each stage does nothing
    before = _checkpoint_shas(fleet_dir)
    for stage in ("train", "export", "verify"):
        again = _cli("fleet", stage, fleet_dir, *(["-t", "onnx"] if stage == "export" else []))
        assert again.exit_code == 0 and "0 done now, 3 already done" in again.output, again.output
    assert _checkpoint_shas(fleet_dir) == before

    # one byte of a verified model flipped under an unchanged manifest: verify re-hashes, never reuses (issue 33)
    flipped = fleet_dir / fleet.devices[0].exported["path"] / "model.onnx"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    again = _cli("fleet", "verify", fleet_dir)
    assert again.exit_code == 1 and "1 failed (device-000)" in again.output, again.output
    assert "2 already done" in again.output, again.output
    status = _cli("fleet", "status", fleet_dir)
    assert "device-000" in status.output and "verified no" in status.output.split("device-001")[0], status.output

    # a changed artifact file is stale: only those devices are exported again
    onnx_file = fleet_dir / fleet.devices[1].exported["path"] / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    again = _cli("fleet", "export", fleet_dir, "-t", "onnx")
    assert "fleet export: 2 done now, 1 already done" in again.output, again.output

    # a key file replaced by another key: every stage refuses the device, the others are unaffected (issue 33)
    from keyedge.keys.keyfile import Key

    Key.generate(4).save(fleet_dir / "keys" / "device-002.bin", overwrite=True)
    for stage in ("train", "export", "verify"):
        again = _cli("fleet", stage, fleet_dir, *(["-t", "onnx"] if stage == "export" else []))
        assert again.exit_code == 1 and "1 failed (device-002)" in again.output, again.output
        assert "but fleet.json records key" in again.output, again.output


@needs_data
@pytest.mark.slow
def test_a_failing_key_is_retried_then_reported_while_the_others_finish(tmp_path, local_ray):
    fleet_dir = _init(tmp_path / "fleet")
    (fleet_dir / "runs").mkdir()
    (fleet_dir / "runs" / "device-001").write_text("not a directory")  # its checkpoint cannot be written
    result = _cli("fleet", "train", fleet_dir, "--engine", "ray", "--retries", "1")
    assert result.exit_code == 1, result.output
    assert "fleet train: 2 done now, 0 already done, 1 failed (device-001)" in result.output
    assert "Traceback" not in result.output
    failure = FleetManifest.read(fleet_dir).device("device-001").failed["train"]
    assert failure["attempts"] == 2 and "device-001" in failure["error"]
    assert sorted(_checkpoint_shas(fleet_dir)) == ["device-000", "device-002"]

    before = _checkpoint_shas(fleet_dir)
    (fleet_dir / "runs" / "device-001").unlink()  # the cause is gone: the rerun trains only that key
    rerun = _cli("fleet", "train", fleet_dir, "--engine", "ray")
    assert rerun.exit_code == 0 and "fleet train: 1 done now, 2 already done" in rerun.output, rerun.output
    after = _checkpoint_shas(fleet_dir)
    assert {k: after[k] for k in before} == before and "device-001" in after
    assert FleetManifest.read(fleet_dir).device("device-001").failed is None


@needs_data
@pytest.mark.slow
def test_a_killed_driver_is_resumed_without_redoing_finished_keys(tmp_path):
    fleet_dir = _init(tmp_path / "fleet", devices=3, train_limit=1500)
    proc = subprocess.Popen(
        [*KEYEDGE, "fleet", "train", str(fleet_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "device-000: done" in line:
            break
    else:
        raise AssertionError("".join(seen))
    time.sleep(1.0)  # device-001 is now mid-training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _checkpoint_shas(fleet_dir)
    assert "device-000" in finished and "device-002" not in finished
    assert FleetManifest.read(fleet_dir).device("device-000").trained is not None  # recorded as soon as it finished

    rerun = subprocess.run([*KEYEDGE, "fleet", "train", str(fleet_dir)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done_now = 3 - len(finished)
    assert f"fleet train: {done_now} done now, {len(finished)} already done" in rerun.stdout, rerun.stdout
    after = _checkpoint_shas(fleet_dir)
    assert {k: after[k] for k in finished} == finished and len(after) == 3
    leftovers = [p.name for p in (fleet_dir / "runs").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "the killed job's unfinished checkpoint was cleaned up"


@pytest.mark.parametrize("swap", ["replaced", "pointed"])
def test_a_fleet_never_trains_a_device_with_another_key(tmp_path, swap):
    """Issue 33: a key file replaced by another key, or fleet.json pointing devices at each other's files.

    ``fleet train`` used to train with whatever key the file held and exit 0.  Now the stage refuses
    the device before any job, and the job itself checks the key it reads (a file swapped in between).
    """
    from keyedge.app.fleet.jobs import train_job
    from keyedge.keys.keyfile import Key

    fleet_dir = _init(tmp_path / "fleet", devices=2)
    fleet = FleetManifest.read(fleet_dir)
    if swap == "replaced":
        for d in fleet.devices:
            Key.generate(4).save(fleet_dir / d.key_file, overwrite=True)
    else:
        a, b = fleet.devices
        a.key_file, b.key_file = b.key_file, a.key_file
        fleet.write()
    result = _cli("fleet", "train", fleet_dir)
    assert result.exit_code == 1 and "2 failed (device-000, device-001)" in result.output, result.output
    assert "but fleet.json records key" in result.output, result.output
    assert not (fleet_dir / "runs").exists() or not any((fleet_dir / "runs").iterdir())
    record = FleetManifest.read(fleet_dir).device("device-000").failed["train"]
    assert record["attempts"] == 0 and "holds key" in record["error"]

    d = fleet.devices[0]
    recipe = json.loads((fleet_dir / "fleet.json").read_text())["recipe"]
    with pytest.raises(KeyedgeError, match=r"fleet\.json records key"):
        train_job(str(tmp_path / "ckpt"), str(fleet_dir / d.key_file), d.fingerprint, recipe, False, "cpu", "/dev/null")
    assert not (tmp_path / "ckpt").exists()


def test_what_a_killed_run_left_is_cleaned_and_said_on_the_terminal(tmp_path):
    """Issue 33: after a kill -9 during `fleet export`, the next run said what it cleaned only in a log file."""
    fleet_dir = _init(tmp_path / "fleet", devices=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = fleet_dir / "artifacts" / f".test_efficientnet-0123456789abcdef.tmp-{dead.pid}-x1y2z3"
    left.mkdir(parents=True)
    (left / "model.onnx").write_bytes(b"half a keyed model")
    result = _cli("fleet", "verify", fleet_dir)
    assert f"removed {left}, the unfinished output of a killed keyedge process" in result.output, result.output
    assert not left.exists()


def test_a_fleet_json_sharing_a_key_file_between_devices_is_refused(tmp_path):
    fleet_dir = _init(tmp_path / "fleet", devices=2)
    document = json.loads((fleet_dir / "fleet.json").read_text())
    document["devices"][1]["key_file"] = "keys/./device-000.bin"
    (fleet_dir / "fleet.json").write_text(json.dumps(document))
    _one_line(_cli("fleet", "train", fleet_dir), "devices[1].key_file", "unique to the device")


def test_one_fleet_command_at_a_time(tmp_path):
    fleet_dir = _init(tmp_path / "fleet", devices=2)
    with fleet_lock(fleet_dir):  # another command holds the fleet
        result = subprocess.run([*KEYEDGE, "fleet", "train", str(fleet_dir)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: another keyedge fleet command (pid ") and len(line.splitlines()) == 1, line


def test_fleet_bad_input_is_one_line(tmp_path):
    def one_line(result, *fragments):
        assert result.exit_code == 2, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and "Traceback" not in result.output, result.output
        for fragment in fragments:
            assert fragment in line, line

    one_line(
        _cli("fleet", "init", tmp_path / "a", "-n", 2, *RECIPE[:1], "tf_efficientnet_lit0", *RECIPE[2:]),
        "unknown model",
    )
    assert not (tmp_path / "a").exists()
    one_line(_cli("fleet", "init", tmp_path / "b", "--name", "a/b", *RECIPE), "not usable as a file name")
    one_line(_cli("fleet", "init", tmp_path / "c", *RECIPE), "at least one device")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    one_line(_cli("fleet", "init", busy, "-n", 1, *RECIPE), "is not empty")
    one_line(_cli("fleet", "train", tmp_path / "nowhere"), "is not a fleet directory")
    fleet_dir = _init(tmp_path / "fleet", devices=2)
    one_line(_cli("fleet", "init", fleet_dir, "-n", 1, *RECIPE), "already holds a fleet")
    one_line(_cli("fleet", "train", fleet_dir, "--engine", "slurm"), "unknown engine")
    one_line(_cli("fleet", "train", fleet_dir, "--address", "auto"), "--address is for --engine ray")
    one_line(_cli("fleet", "export", fleet_dir, "-t", "tensorrt"), "tensorrt")
    document = json.loads((fleet_dir / "fleet.json").read_text())
    document["devices"][0]["checkpoint"] = "../../etc"
    (fleet_dir / "fleet.json").write_text(json.dumps(document))
    one_line(_cli("fleet", "train", fleet_dir), "devices[0].checkpoint", "inside the fleet directory")
    (fleet_dir / "fleet.json").write_text('{"format": "keyedge-fleet/1", "devi')
    one_line(_cli("fleet", "status", fleet_dir), "fleet.json")


@pytest.fixture(scope="module")
def fleet_document(tmp_path_factory):
    directory = _init(tmp_path_factory.mktemp("fleet-doc") / "fleet", devices=2)
    document = json.loads((directory / "fleet.json").read_text())
    document["devices"][0]["trained"] = {"sha256": "0" * 64, "epoch": 1, "test_accuracy": 0.5}
    document["devices"][0]["failed"] = {"export": {"error": "no space left on device", "attempts": 2}}
    return document


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fleet_manifest_reader_never_crashes(fleet_document, data, fuzz_document, tmp_path):
    def read(document):
        (tmp_path / "fleet.json").write_text(json.dumps(document))
        fleet = FleetManifest.read(tmp_path)
        status_rows(fleet)  # what `fleet status` shows of it

    fuzz_document(read, fleet_document, data)


def test_fleet_reader_names_a_bad_field(fleet_document, tmp_path):
    document = json.loads(json.dumps(fleet_document))
    document["devices"][1]["fingerprint"] = document["devices"][0]["fingerprint"][:8]
    (tmp_path / "fleet.json").write_text(json.dumps(document))
    with pytest.raises(KeyedgeError, match=r"devices\[1\]\.fingerprint"):
        FleetManifest.read(tmp_path)


def _one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in line, line


def test_fleet_json_follows_its_json_schema(fleet_document):
    import jsonschema

    schema = json.loads((DOCS / "fleet.schema.json").read_text())
    assert fleet_document["schema"] == "keyedge-fleet/1" and "format" not in fleet_document
    jsonschema.validate(fleet_document, schema)  # as `fleet init` wrote it, with a trained and a failed record
    legacy = {k: v for k, v in fleet_document.items() if k != "schema"} | {"format": "keyedge-fleet/1"}
    jsonschema.validate(legacy, schema)
    for edit in (
        lambda d: d["recipe"].update(epoch=3),  # an unknown recipe field
        lambda d: d.update(block_size=100),
        lambda d: d["devices"][0].update(checkpoint="../elsewhere"),
        lambda d: d.pop("schema"),
    ):
        bad = json.loads(json.dumps(fleet_document))
        edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_a_fleet_of_the_previous_release_is_read_then_written_with_schema(fleet_document, tmp_path):
    legacy = {"format": "keyedge-fleet/1", **{k: v for k, v in fleet_document.items() if k != "schema"}}
    (tmp_path / "fleet.json").write_text(json.dumps(legacy))
    fleet = FleetManifest.read(tmp_path)
    assert [d.name for d in fleet.devices] == [d["name"] for d in fleet_document["devices"]]
    assert fleet.devices[0].trained == fleet_document["devices"][0]["trained"]
    assert _cli("fleet", "status", tmp_path).exit_code == 0
    fleet.write()  # the next write (after any job) is in the new form
    written = json.loads((tmp_path / "fleet.json").read_text())
    assert written["schema"] == "keyedge-fleet/1" and "format" not in written
    assert written == fleet_document and FleetManifest.read(tmp_path) == fleet


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["recipe"].update(epoch=5), ("recipe.epoch", "is not a recipe field")),
        (lambda d: d["recipe"].update(epochs=0), ("recipe.epochs", "integer >= 1")),
        (lambda d: d["recipe"].update(finetune="half"), ("recipe.finetune", "full, lora")),
        (lambda d: d.update(block_size=100), ("block_size", "1..64")),
        (lambda d: d.update(schema="keyedge-fleet/2"), ("newer",)),
        (lambda d: d.update(schema="keyedge-checkpoint/1"), ("field 'schema'",)),
        (lambda d: d.pop("schema") and d.update(format="keyedge-fleet/0"), ("not a keyedge fleet manifest",)),
        (lambda d: d["devices"][1].update(name=d["devices"][0]["name"]), ("devices[1].name", "unique")),
        (lambda d: d["devices"][0].update(failed={"train": "boom"}), ("devices[0].failed.train",)),
        (lambda d: d["devices"][0]["trained"].update(sha256="x"), ("devices[0].trained.sha256",)),
    ],
)
def test_a_bad_fleet_json_is_one_line_naming_the_file_and_field(fleet_document, tmp_path, edit, fragments):
    document = json.loads(json.dumps(fleet_document))
    edit(document)
    (tmp_path / "fleet.json").write_text(json.dumps(document))
    _one_line(_cli("fleet", "status", tmp_path), str(tmp_path / "fleet.json"), *fragments)


@pytest.mark.parametrize(
    ("option", "fragments"),
    [(["-b", "100"], ("--block-size", "1..64")), (["--lora-r", "5000"], ("--lora-r", "1..4096"))],
)
def test_fleet_init_refuses_what_the_manifest_reader_would(tmp_path, option, fragments):
    _one_line(_cli("fleet", "init", tmp_path / "fleet", "-n", 2, *RECIPE, *option), *fragments)
    assert not (tmp_path / "fleet").exists()


@pytest.mark.slow
def test_a_lost_ray_worker_is_a_failed_attempt(local_ray):
    """A worker that dies mid-job (killed, out of memory) is retried, then reported; the other jobs are unaffected."""
    import functools
    import os

    from keyedge.app.engine import Job, RayEngine

    engine = RayEngine(None, cpus_per_job=1)  # joins the test's Ray instance
    seen = []
    outcomes = engine.run(
        [Job("dies", functools.partial(os._exit, 3), {}), Job("works", dict, {"answer": 42})],
        retries=1,
        on_done=seen.append,
    )
    by_name = {o.name: o for o in outcomes}
    assert by_name["works"].ok and by_name["works"].result == {"answer": 42}
    assert not by_name["dies"].ok and by_name["dies"].attempts == 2 and "worker was lost" in by_name["dies"].error
    assert [o.name for o in seen] == [o.name for o in outcomes]
    assert not engine.started  # it joined the running instance: closing it must not stop that
