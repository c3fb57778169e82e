"""Promises under careless or hostile use: --overwrite never deletes what keyedge did not write (issue 19 slice)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from typer.testing import CliRunner

from keyedge.app.quickstart import MARKER, prepare_out
from keyedge.cli import app
from keyedge.errors import OutputError

runner = CliRunner()


def _one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and "Traceback" not in result.output, line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("out", [".", ".."])
def test_quickstart_overwrite_never_deletes_the_current_directory_or_a_parent(tmp_path, monkeypatch, out):
    work = tmp_path / "project"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    (tmp_path / "other.txt").write_text("keep me")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["quickstart", "--out", out, "--overwrite", "--fast"])
    _one_line(result, "--overwrite")
    assert (work / "thesis.tex").read_text() == "years of work" and (tmp_path / "other.txt").exists()


def test_quickstart_overwrite_refuses_a_directory_it_did_not_make(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    result = runner.invoke(app, ["quickstart", "--out", str(foreign), "--overwrite", "--fast"])
    _one_line(result, "not made by keyedge quickstart")
    assert (foreign / "cat.jpg").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    _one_line(runner.invoke(app, ["quickstart", "--out", str(a_file), "--overwrite", "--fast"]), "not made by")
    assert a_file.read_text() == "x"


def test_quickstart_overwrite_replaces_its_own_output(tmp_path):
    out = tmp_path / "demo"
    prepare_out(out, overwrite=False)
    assert (out / MARKER).is_file()
    (out / "report").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        prepare_out(out, overwrite=False)
    prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_quickstart_overwrite_refuses_a_symlink_to_a_quickstart_directory(tmp_path):
    real = tmp_path / "real"
    prepare_out(real, overwrite=False)
    (real / "report").mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(OutputError, match="not made by"):
        prepare_out(link, overwrite=True)
    assert (real / "report").is_dir()


@pytest.mark.slow
def test_two_concurrent_exports_of_one_key_leave_one_complete_artifact_set(tmp_path):
    import json
    import stat
    import subprocess
    import sys

    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.fileio import sha256_file
    from keyedge.keys.keyfile import Key
    from keyedge.models.backbones import build_model

    key = Key.from_secret(bytes(range(32)), 4)
    ckpt = untrained_checkpoint(
        tmp_path / "ckpt", build_model("test_efficientnet", 10, key=key, weights="none", image_size=32).eval()
    )
    key_file = key.save(tmp_path / "k.bin")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "keyedge",
        "export",
        "-c",
        str(ckpt),
        "-k",
        str(key_file),
        "-o",
        str(out),
        "-t",
        "onnx",
        "-t",
        "openvino",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, _, err in results:
        if code == 2:
            assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    (final,) = [p for p in out.iterdir()]  # no hidden staging or .old directory left behind
    assert not final.name.startswith(".") and stat.S_IMODE(final.stat().st_mode) == 0o700
    manifest = json.loads((final / "manifest.json").read_text())
    for entry in manifest["targets"].values():
        for f in entry["files"]:
            assert sha256_file(final / f["path"]) == f["sha256"], f


# ---- one-line errors for bad input, never a traceback or a panel ----------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["export", "--bogus"], "No such option: --bogus"),
        (["key", "new"], "Missing option '--out'"),
        (["keygen"], "Missing option '--out'"),
        (["bench", "latency"], "Missing argument"),
        (["bench", "latency", "--threads", "x", "dir"], "Invalid value for '--threads'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["bench", "robustness", "ckpt", "--eps", "8"], "more than the whole [0, 1] pixel range"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    _one_line(runner.invoke(app, args), fragment)


def test_file_names_are_never_markup(tmp_path):
    (tmp_path / "k[").mkdir()
    out = tmp_path / "k[/x].bin"  # rich would read "[/x]" as a closing tag and fail after the key was written
    result = runner.invoke(app, ["key", "new", "-b", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and out.is_file()
    shown = runner.invoke(app, ["key", "show", str(out)])
    assert shown.exit_code == 0 and str(out) in shown.stdout, shown.output


@pytest.mark.parametrize(
    "runtime, extra, fragment",
    [
        ('name = "onnxruntime.x"', "", "runtime[0].name"),
        ('name = "openvino"\ndevice = "TPU"', "", "runtime[0].device"),
        ('name = "onnxruntime"', "min_seconds = inf", "min_seconds"),
        ('name = "onnxruntime"\nspinning = "yes"', "", "runtime[0].spinning"),
    ],
)
def test_bad_profiles_are_one_line(tmp_path, runtime, extra, fragment):
    profile = tmp_path / "p.toml"
    profile.write_text(f'name = "p"\n{extra}\n[[runtime]]\n{runtime}\n')
    (tmp_path / "a.onnx").write_bytes(b"not onnx")
    _one_line(runner.invoke(app, ["bench", "latency", str(tmp_path / "a.onnx"), "--profile", str(profile)]), fragment)


def test_a_key_given_for_a_plain_checkpoint_is_not_silently_ignored(tmp_path):
    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.keys.keyfile import Key
    from keyedge.models.backbones import build_model

    ckpt = untrained_checkpoint(
        tmp_path / "plain", build_model("test_efficientnet", 10, weights="none", image_size=32).eval()
    )
    key_file = Key.generate(4).save(tmp_path / "k.bin")
    result = runner.invoke(app, ["export", "-c", str(ckpt), "-k", str(key_file), "-o", str(tmp_path / "out")])
    _one_line(result, "plain model", "--allow-key-mismatch")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bench_latency_refuses_an_artifact_it_cannot_load_and_never_clobbers_a_report(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    _one_line(runner.invoke(app, ["bench", "latency", str(bad), "--no-progress"]), "cannot load", "model.onnx")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "latency.json").write_text("precious")
    _one_line(
        runner.invoke(app, ["bench", "latency", str(bad), "--out", str(reports)]), "already exists", "--overwrite"
    )
    assert (reports / "latency.json").read_text() == "precious"


@pytest.mark.parametrize(
    ("old", "name", "target", "fragment"),
    [
        ("--json", "latency.json", "r.json", "already exists"),
        ("--markdown", "latency.md", "dir", "a directory"),
        ("--json", "latency.json", "no/r.json", "does not exist"),
    ],
)
def test_bench_latency_old_report_flags_still_check_their_file_first(tmp_path, old, name, target, fragment):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    (tmp_path / "r.json").write_text("precious")
    (tmp_path / "dir").mkdir()
    result = runner.invoke(app, ["bench", "latency", str(bad), old, str(tmp_path / target)])
    note, *rest = [line for line in result.stderr.splitlines() if line.strip()]
    assert note == f"note: {old} is now --out DIR (DIR/{name}); {old} will be removed in the next release"
    assert result.exit_code == 2 and len(rest) == 1 and rest[0].startswith("error: ") and fragment in rest[0]
    assert (tmp_path / "r.json").read_text() == "precious"


def test_bench_latency_out_and_the_old_report_flags(tmp_path):
    """--out DIR writes DIR/latency.json and DIR/latency.md; --json/--markdown still write their files, with a note."""
    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.models.backbones import build_model

    ckpt = untrained_checkpoint(
        tmp_path / "plain", build_model("test_efficientnet", 10, weights="none", image_size=32).eval()
    )
    fast = ["--no-progress", "--min-seconds", "0.01", "--min-iterations", "2", "--rounds", "1", "--batch", "1"]
    old = ["--json", str(tmp_path / "old.json"), "--markdown", str(tmp_path / "old.md")]
    result = runner.invoke(app, ["bench", "latency", str(ckpt), *fast, "--out", str(tmp_path / "rep"), *old])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["latency.json", "latency.md"]
    assert (tmp_path / "rep" / "latency.json").read_text() == (tmp_path / "old.json").read_text()
    assert json.loads((tmp_path / "old.json").read_text())["schema"] == "keyedge-latency/1"
    assert (tmp_path / "rep" / "latency.md").read_text() == (tmp_path / "old.md").read_text()
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: --json is now --out DIR (DIR/latency.json); --json will be removed in the next release",
        "note: --markdown is now --out DIR (DIR/latency.md); --markdown will be removed in the next release",
    ]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "0"),
        ("--weight-decay", "nan"),
        ("--warmup-epochs", "inf"),
        ("--label-smoothing", "nan"),
        ("--ortho-lambda", "nan"),
    ],
)
def test_train_refuses_nan_and_infinite_settings_before_writing(tmp_path, flag, value):
    """typer's min/max let NaN through; torch then raised a traceback (issue 19: `--lr nan`)."""
    out = tmp_path / "run"
    args = ["train", "-m", "test_resnet", "--weights", "none", "-d", "fashion-mnist", "--image-size", "32"]
    result = runner.invoke(app, [*args, "--epochs", "1", "-o", str(out), flag, value])
    _one_line(result, flag)  # typer refuses some itself (its range check), keyedge the rest
    assert not out.exists()


# ---- the wider corpus: every command, fed what a careless or hostile user would feed it (issue 19) ----------------


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb needs no more to be refused)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: _png_header_only(d / "bomb.png", 30000, 30000), "decompression bomb"),
        (lambda d: (d / "t.png").write_text("not an image") and d / "t.png", "not an image file"),
        (lambda d: (d / "sub").mkdir() or d / "sub", "is a directory"),
        (lambda d: d / "missing.png", "not found"),
    ],
    ids=["bomb", "text-as-png", "directory", "missing"],
)
def test_shuffle_refuses_what_is_not_a_sane_image(tmp_path, small_keyed_checkpoint, make, fragment):
    image = make(tmp_path)
    out = tmp_path / "s.png"
    _one_line(
        runner.invoke(app, ["shuffle", str(image), "-k", str(small_keyed_checkpoint[1]), "-o", str(out)]), fragment
    )
    assert not out.exists()


def test_deep_and_float_images_are_scaled_or_refused_never_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from keyedge.data.images import read_image
    from keyedge.errors import ImageError

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520: a 16-bit gradient
    Image.fromarray(ramp).save(tmp_path / "16.png")
    got = read_image(tmp_path / "16.png")
    assert got.shape == (64, 64, 3) and (got == 255).mean() < 0.01  # was 99.6% white when clipped
    assert np.abs(got[..., 0].astype(float) - ramp / 257).max() <= 0.5
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert (read_image(tmp_path / "f.tif") == 128).all()  # a float image in [0, 1], not black
    Image.fromarray(np.full((8, 8), 7.0, np.float32)).save(tmp_path / "g.tif")
    with pytest.raises(ImageError, match="outside"):
        read_image(tmp_path / "g.tif")


def test_a_tiny_image_gets_a_hint_that_can_work(tmp_path, small_keyed_checkpoint):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "tiny.png")
    result = runner.invoke(
        app, ["shuffle", str(tmp_path / "tiny.png"), "-k", str(small_keyed_checkpoint[1]), "-o", "x.png"]
    )
    _one_line(result, "4x4")
    assert "0x0" not in result.stderr


@pytest.mark.parametrize(
    "name, fragment",
    [("x" * 300 + ".bin", "too long"), ("file/k.bin", "is a file"), ("dangling", "already exists")],
)
def test_key_new_refuses_bad_output_paths(tmp_path, name, fragment):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _one_line(runner.invoke(app, ["key", "new", "-b", "4", "-o", str(tmp_path / name)]), fragment)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "empty"), (b"\0" * 10, ""), (bytes(range(256)) * 4, ""), (b"x" * (1 << 21), "far larger")],
    ids=["empty", "zeros", "noise", "huge"],
)
def test_key_show_refuses_what_is_not_a_key(tmp_path, content, fragment):
    (tmp_path / "k.bin").write_bytes(content)
    result = runner.invoke(app, ["key", "show", str(tmp_path / "k.bin")])
    _one_line(result, fragment)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:7", "xla", "meta", "bogus"])
def test_eval_refuses_a_device_this_host_lacks(small_keyed_checkpoint, device):
    ckpt, key_file = small_keyed_checkpoint
    _one_line(runner.invoke(app, ["eval", "-c", str(ckpt), "-k", str(key_file), "-d", "x", "--device", device]), device)


EDITS = {
    "key-not-object": lambda d: d.__setitem__("key", "abc"),
    "no-fingerprint": lambda d: d["key"].pop("fingerprint"),
    "int-file-name": lambda d: d["files"]["weights"].__setitem__("file", 5),
    "path-escape": lambda d: d["files"]["weights"].__setitem__("file", "../../etc/passwd"),
    "huge-classes": lambda d: d["model"].__setitem__("num_classes", 10**12),
    "negative-size": lambda d: d["model"].__setitem__("image_size", -5),
    "huge-size": lambda d: d["model"].__setitem__("image_size", 10**6),
    "lora-without-settings": lambda d: d["finetune"].update(mode="lora", lora=None),
    "list-manifest": lambda d: d.clear() or d.setdefault("x", [1]),
    "newer-schema": lambda d: d.__setitem__("schema", "keyedge-checkpoint/99"),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_a_hand_edited_checkpoint_manifest_is_one_line(tmp_path, small_keyed_checkpoint, edit):
    import json
    import shutil

    ckpt, key_file = small_keyed_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    doc = json.loads((copy / "keyedge.json").read_text())
    EDITS[edit](doc)
    (copy / "keyedge.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    _one_line(runner.invoke(app, ["export", "-c", str(copy), "-k", str(key_file), "-o", str(out)]), "keyedge.json")
    assert not out.exists() or not any(out.iterdir())


def test_non_finite_weights_are_refused_on_load_and_never_saved(tmp_path, small_keyed_checkpoint):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from keyedge.checkpoints import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
    from keyedge.fileio import sha256_file

    ckpt, key_file = small_keyed_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    manifest = read_manifest(copy)
    weights = copy / manifest.files["weights"].file
    tensors = load_file(str(weights))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, str(weights))
    text = (copy / "keyedge.json").read_text().replace(manifest.files["weights"].sha256, sha256_file(weights))
    (copy / "keyedge.json").write_text(text)  # the hash is updated too: only the values are wrong
    _one_line(
        runner.invoke(app, ["export", "-c", str(copy), "-k", str(key_file), "-o", str(tmp_path / "o")]), "non-finite"
    )
    from keyedge.keys.keyfile import load_key

    model, _ = load_checkpoint(ckpt, load_key(key_file))
    with torch.no_grad():
        next(p for p in model.parameters() if p.is_floating_point()).fill_(float("inf"))
    with pytest.raises(CheckpointError, match="diverged"):
        save_checkpoint(tmp_path / "new", model, epoch=1, finetune={"mode": "full"}, data={}, training={}, metrics={})
    assert not (tmp_path / "new").exists()


def test_a_pickled_training_state_is_refused_without_suggesting_to_unpickle(tmp_path, small_keyed_checkpoint):
    import pickle
    import shutil

    from keyedge.checkpoints import CheckpointError, load_training_state, read_manifest
    from keyedge.fileio import sha256_file

    ckpt, _ = small_keyed_checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    manifest = read_manifest(copy)
    state = copy / "state-e000-evil.pt"
    state.write_bytes(pickle.dumps({"x": print}))  # a pickled callable: would run on load without weights_only
    import json

    doc = json.loads((copy / "keyedge.json").read_text())
    doc["files"]["state"] = {"file": state.name, "sha256": sha256_file(state)}
    (copy / "keyedge.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as info:
        load_training_state(copy, read_manifest(copy))
    assert "weights_only=False" not in str(info.value) and "refused" in str(info.value)
    assert manifest.files["weights"].file


_LATENCY = '{"schema": "keyedge-latency/1", "environment": {}, "profile": {}, "settings": {}, "measurements": []}'


@pytest.mark.parametrize(
    "report, fragment",
    [
        ("[1, 2]", "not a latency report"),
        (_LATENCY.replace('"measurements": []', '"measurements": 5'), "measurements"),
        (_LATENCY.replace('"profile": {}', '"profile": {"thresholds": {"ratio": null}}'), "thresholds.ratio"),
        ("{not json", "not valid JSON"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),  # a traceback before (issue 33)
    ],
    ids=["list", "measurements-int", "threshold-null", "not-json", "deep"],
)
def test_bench_regress_refuses_malformed_reports(tmp_path, report, fragment):
    (tmp_path / "r.json").write_text(report)
    _one_line(runner.invoke(app, ["bench", "regress", "--current", str(tmp_path / "r.json")]), fragment)


def test_bench_refusals_come_before_the_work(small_keyed_checkpoint, tmp_path):
    """Issue 33: a keyed checkpoint without its key was a "skipped" line and exit 0; a report directory that
    cannot be made was refused after every attack had run."""
    ckpt, key_file = small_keyed_checkpoint
    _one_line(runner.invoke(app, ["bench", "latency", str(ckpt), "--no-progress"]), "no key with fingerprint")
    (tmp_path / "file").write_text("x")
    for out, fragment in ((tmp_path / "file" / "rep", "is a file"), ("/proc/keyedge/rep", "cannot write")):
        started = time.perf_counter()
        args = ["bench", "robustness", str(ckpt), "-k", str(key_file), "-o", str(out)]
        _one_line(runner.invoke(app, args), fragment)
        assert time.perf_counter() - started < 20, "refused only after the attacks ran"
    train = ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--weights", "none", "-o", "/proc/keyedge/c"]
    _one_line(runner.invoke(app, train), "cannot write")  # it trained a whole epoch first


def test_artifact_manifest_that_is_a_list_is_one_line_for_verify_and_bench(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("[]")
    for args in (["verify", str(tmp_path / "art")], ["bench", "latency", str(tmp_path / "art"), "--no-progress"]):
        _one_line(runner.invoke(app, args), "manifest.json")


def _where(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


@pytest.mark.parametrize("where", ["entering", "leaving"])
def test_a_signal_while_converter_output_is_captured_gives_the_terminal_back(monkeypatch, where):
    """A Ctrl-C that lands inside the capture's own set-up or tear-down (seen in CI as a silent SIGTERM exit)."""
    import logging

    from keyedge.exporters import capture as base

    before = (_where(1), _where(2), sys.stdout, sys.stderr)
    real_disable = logging.disable

    def interrupted(*_args):
        raise KeyboardInterrupt

    def interrupted_once(level):
        monkeypatch.setattr(logging, "disable", real_disable)
        raise KeyboardInterrupt

    if where == "entering":  # after descriptors 1 and 2 were pointed at the capture file
        monkeypatch.setattr(logging, "disable", interrupted_once)
    else:  # after the Python streams were given back, before the descriptors were
        monkeypatch.setattr(base, "_flush_c_stdio", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with base.Quiet():
            print("converter chatter")
    monkeypatch.undo()
    assert (_where(1), _where(2), sys.stdout, sys.stderr) == before
    assert logging.root.manager.disable == logging.NOTSET
