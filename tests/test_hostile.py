"""Promises under careless or hostile use: --overwrite never deletes what keyedge did not write (issue 19 slice)."""

from __future__ import annotations

import os

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
    result = runner.invoke(app, ["keygen", "-b", "4", "-o", str(out)])
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
    report = tmp_path / "r.json"
    report.write_text("precious")
    _one_line(
        runner.invoke(app, ["bench", "latency", str(bad), "--json", str(report)]), "already exists", "--overwrite"
    )
    assert report.read_text() == "precious"
    (tmp_path / "dir").mkdir()
    _one_line(runner.invoke(app, ["bench", "latency", str(bad), "--markdown", str(tmp_path / "dir")]), "a directory")
    missing = tmp_path / "no" / "such" / "r.json"
    _one_line(runner.invoke(app, ["bench", "latency", str(bad), "--json", str(missing)]), "does not exist")


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
