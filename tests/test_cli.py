"""The CLI end to end: key new, key show, import-seed, shuffle, doctor -- and every bad input; old spellings."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from keyedge.cli import app
from keyedge.errors import KeyFileError
from keyedge.keys.keyfile import load_key

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments: str):
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def photo(tmp_path):
    img = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "k1.bin"
    assert run("key", "new", "--block-size", 4, "--out", path).exit_code == 0
    return path


def test_help_everywhere():
    for args in (
        [],
        ["keygen"],
        ["key"],
        ["key", "new"],
        ["key", "show"],
        ["key", "import-seed"],
        ["shuffle"],
        ["doctor"],
    ):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, args


def test_key_new_writes_private_key(tmp_path, keyfile):
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    key = load_key(keyfile)
    assert key.block_size == 4 and key.fixed_points == 0
    assert listing(tmp_path) == ["k1.bin"]


def test_key_new_refuses_overwrite_without_overwrite(tmp_path, keyfile):
    before = keyfile.read_bytes()
    assert_clean_error(run("key", "new", "-b", 4, "-o", keyfile), "already exists", "--overwrite")
    assert keyfile.read_bytes() == before
    result = run("key", "new", "-b", 8, "-o", keyfile, "--overwrite")
    assert result.exit_code == 0 and "note:" not in result.stderr
    assert load_key(keyfile).block_size == 8
    assert listing(tmp_path) == ["k1.bin"]


def test_key_new_bad_output_paths(tmp_path):
    assert_clean_error(run("key", "new", "-o", tmp_path / "missing" / "k.bin"), "does not exist")
    assert_clean_error(run("key", "new", "-o", tmp_path), "is a directory")
    assert_clean_error(run("key", "new", "-o", "/proc/k.bin"), "/proc")
    assert listing(tmp_path) == []


def test_key_new_rejects_bad_block_size(tmp_path):
    result = run("key", "new", "-b", 0, "-o", tmp_path / "k.bin")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert listing(tmp_path) == []


def test_key_show_hides_permutation_unless_revealed(keyfile):
    key = load_key(keyfile)
    shown = run("key", "show", keyfile)
    assert shown.exit_code == 0
    assert key.fingerprint in shown.stdout and "100.0%" in shown.stdout
    perm_text = " ".join(map(str, key.permutation))
    assert perm_text not in shown.stdout
    info = json.loads(run("key", "show", keyfile, "--json").stdout)
    assert info["fingerprint"] == key.fingerprint and info["block_size"] == 4
    assert info["moved_fraction"] == 1.0 and info["format_version"] == 1
    assert "permutation" not in info
    revealed = json.loads(run("key", "show", keyfile, "--json", "--reveal").stdout)
    assert revealed["permutation"] == key.permutation.tolist()
    assert perm_text in run("key", "show", keyfile, "--reveal").stdout


def test_key_show_warns_on_loose_permissions(keyfile):
    keyfile.chmod(0o644)
    result = run("key", "show", keyfile)
    assert result.exit_code == 0 and "chmod 600" in result.stderr


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"KEYEDGE\x00\x01\x00", "truncated"),
        (b"GIF89a not a key at all", "not a keyedge key file"),
    ],
)
def test_key_show_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    assert_clean_error(run("key", "show", path), message, str(path))


def test_key_show_corrupted_truncated_future(tmp_path, keyfile):
    data = keyfile.read_bytes()
    (tmp_path / "corrupt.bin").write_bytes(data[:30] + bytes([data[30] ^ 4]) + data[31:])
    assert_clean_error(run("key", "show", tmp_path / "corrupt.bin"), "integrity check")
    (tmp_path / "short.bin").write_bytes(data[:-1])
    assert_clean_error(run("key", "show", tmp_path / "short.bin"), "truncated")
    (tmp_path / "future.bin").write_bytes(data[:8] + b"\x07\x00" + data[10:])
    assert_clean_error(run("key", "show", tmp_path / "future.bin"), "version 7", "upgrade keyedge")
    assert_clean_error(run("key", "show", tmp_path / "absent.bin"), "not found")


def test_import_seed(tmp_path):
    import torch

    out = tmp_path / "legacy.bin"
    result = run("key", "import-seed", 1234, "--block-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        assert load_key(out).permutation.tolist() == torch.randperm(48).tolist()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert_clean_error(run("key", "import-seed", 1, "-b", 4, "-o", out), "already exists", "--overwrite")
    assert run("key", "import-seed", 1, "-b", 4, "-o", out, "--overwrite").exit_code == 0
    assert run("key", "import-seed", -3, "-b", 4, "-o", tmp_path / "neg.bin").exit_code == 2
    assert not (tmp_path / "neg.bin").exists()


def test_shuffle_and_inverse_round_trip(tmp_path, photo, keyfile):
    shuffled, restored = tmp_path / "s.png", tmp_path / "r.png"
    result = run("shuffle", photo, "--key-file", keyfile, "--out", shuffled)
    assert result.exit_code == 0, result.output
    assert load_key(keyfile).fingerprint in result.stdout
    original = np.asarray(Image.open(photo))
    mixed = np.asarray(Image.open(shuffled))
    assert mixed.shape == original.shape and not np.array_equal(mixed, original)
    assert np.array_equal(np.sort(mixed, axis=None), np.sort(original, axis=None))
    assert run("shuffle", shuffled, "-k", keyfile, "-o", restored, "--inverse").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(restored)), original)


def test_shuffle_grayscale_is_expanded(tmp_path, keyfile):
    gray = tmp_path / "g.png"
    Image.fromarray((np.arange(16 * 16) % 256).astype(np.uint8).reshape(16, 16)).save(gray)
    assert run("shuffle", gray, "-k", keyfile, "-o", tmp_path / "o.png").exit_code == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (16, 16, 3)


def test_shuffle_block_size_must_divide(tmp_path, keyfile):
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((30, 48, 3), np.uint8)).save(odd)
    assert_clean_error(
        run("shuffle", odd, "-k", keyfile, "-o", tmp_path / "o.png"),
        "30x48",
        "block size 4 does not divide its height",
        "28x48",
    )
    assert not (tmp_path / "o.png").exists()


def test_shuffle_bad_inputs_leave_nothing(tmp_path, photo, keyfile):
    before = listing(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    before.append("notes.png")
    assert_clean_error(run("shuffle", text, "-k", keyfile, "-o", tmp_path / "o.png"), "not an image file")
    assert_clean_error(run("shuffle", tmp_path / "nope.png", "-k", keyfile, "-o", tmp_path / "o.png"), "not found")
    assert_clean_error(run("shuffle", photo, "-k", tmp_path / "nokey.bin", "-o", tmp_path / "o.png"), "not found")
    assert_clean_error(run("shuffle", photo, "-k", keyfile, "-o", tmp_path / "o.xyz"), "image format")
    assert_clean_error(run("shuffle", photo, "-k", keyfile, "-o", tmp_path / "no" / "o.png"), "does not exist")
    assert_clean_error(run("shuffle", photo, "-k", keyfile, "-o", photo), "already exists", "--overwrite")
    assert listing(tmp_path) == sorted(before)


def test_shuffle_overwrite_replaces_out(tmp_path, photo, keyfile):
    out = tmp_path / "s.png"
    assert run("shuffle", photo, "-k", keyfile, "-o", out).exit_code == 0
    result = run("shuffle", photo, "-k", keyfile, "-o", out, "--inverse", "--overwrite")
    assert result.exit_code == 0 and "note:" not in result.stderr and "un-shuffled" in result.stdout


def test_shuffle_lossy_output_warns(tmp_path, photo, keyfile):
    result = run("shuffle", photo, "-k", keyfile, "-o", tmp_path / "s.jpg")
    assert result.exit_code == 0 and "lossy" in result.stderr


def test_doctor_reports_targets_and_runtimes():
    result = run("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["extras"]) >= {"onnx", "openvino", "coreml", "train"}
    checks = {(c["section"], c["name"]): c for c in report["checks"]}
    assert checks[("runtime", "torch-cpu")]["ok"]
    if sys.platform != "darwin":
        coreml = checks[("runtime", "coreml")]
        assert not coreml["ok"] and "macOS" in coreml["detail"]
    for name in ("onnx", "openvino", "coreml", "litert", "executorch"):  # installed by the dev extra
        assert checks[("export", name)]["ok"], checks[("export", name)]
    for name in ("onnxruntime", "openvino", "litert", "executorch"):
        assert checks[("runtime", name)]["ok"], checks[("runtime", name)]
    assert checks[("compatibility", "coremltools/numpy")]["ok"]  # make test installs one working set
    assert run("doctor").exit_code == 0


def test_console_script_bad_input_has_no_traceback(tmp_path):
    """Through a real process: `python -m keyedge` prints one line and exits 2."""
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "keyedge", "key", "show", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_a_file_name_with_control_characters_is_still_one_line(tmp_path):
    """Issue 33: a newline or escape sequence in a path no longer splits the error or rewrites the terminal."""
    name = tmp_path / "a\nb\x1b[31m\u202e.bin"
    proc = subprocess.run(
        [sys.executable, "-m", "keyedge", "key", "show", str(name)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "a\\nb\\x1b[31m\\u202e.bin" in proc.stderr and "\x1b" not in proc.stderr, proc.stderr


def test_a_library_warning_does_not_precede_the_error_line(monkeypatch, tmp_path):
    """Issue 33: a warning raised on the way to an error is dropped (the error says what matters)..."""
    import warnings

    import keyedge.cli.keys as keys_cli

    def warn_then_fail(path):
        warnings.warn("some library's remark", UserWarning, stacklevel=1)
        raise KeyFileError("key file x is broken", "restore it")

    monkeypatch.setattr(keys_cli, "load_key", warn_then_fail)
    assert_clean_error(run("key", "show", tmp_path / "k.bin"), "key file x is broken")


def test_a_warning_of_a_command_that_succeeds_is_still_shown(keyfile):
    """...but shown, after the output, when the command succeeds (a real process: pytest captures warnings)."""
    script = (
        "import sys, warnings; import keyedge.cli.keys as k; real = k.load_key\n"
        "k.load_key = lambda p: (warnings.warn('some library remark', stacklevel=1), real(p))[1]\n"
        "sys.argv = ['keyedge', 'key', 'show', sys.argv[1]]\n"
        "from keyedge.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(keyfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "some library remark" in proc.stderr, proc.stderr


# -- flags mean the same everywhere -----------------------------------------------------------------------------------


def all_commands():
    """(path, click command) of every keyedge sub-command, nested groups included."""
    import typer

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), command

    return list(walk(typer.main.get_command(app), []))


def test_device_data_force_mean_one_thing_everywhere():
    seen = set()
    for path, command in all_commands():
        for option in (p for p in command.params if p.param_type_name == "option" and not p.hidden):
            names = set(option.opts)
            seen |= names
            if "-d" in names:
                assert names == {"-d", "--data"}, (path, names)
            if "--device" in names:  # a torch device, never a profile file
                assert option.default == "auto" and "profile" not in option.help, (path, option.help)
            if "--profile" in names:
                assert "rofile" in option.help and option.default is None, (path, option.help)
            if "--overwrite" in names:
                assert option.help.startswith("Replace") or option.help.startswith("Start over, replacing"), (
                    path,
                    option.help,
                )
            if names & {"--key-file", "-k"}:
                assert names == {"--key-file", "-k"}, (path, names)
            assert "--force" not in names, path  # the old spelling of --overwrite: hidden, for one release
            assert not names & {"--json", "--markdown"} or not path.startswith("bench l"), path  # now --out DIR
    assert {"-d", "--data", "--device", "--profile", "--overwrite", "--key-file", "--allow-key-mismatch"} <= seen


def test_shared_options_are_declared_once():
    """--key-file, --overwrite and --force (its old spelling) are declared in keyedge/cli/_flags.py only."""
    import re
    from pathlib import Path

    import keyedge.cli

    declared = re.compile(r'(?:Option\(\s*[^,"]*,|renamed\()\s*"--(?:key-file|overwrite|force)"')
    sources = {source.name: source.read_text() for source in Path(keyedge.cli.__file__).parent.glob("*.py")}
    assert len(declared.findall(sources.pop("_flags.py"))) == 3  # --key-file, --overwrite, --force
    for name, text in sources.items():
        assert not declared.findall(text), name


def test_every_integer_flag_is_bounded():
    """Issue 33: integers past what C types hold were overflow tracebacks (a batch of 10**20), or work without end
    (a fleet of 10**20 devices). One rule bounds every integer flag of every command."""
    import typer

    from keyedge.cli import _bound_integers

    command = typer.main.get_command(app)
    _bound_integers(command)

    def walk(c, path):
        for name, sub in getattr(c, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")
        yield from ((path, param) for param in getattr(c, "params", []))

    unbounded = [
        f"{path} {param.opts[0]}"
        for path, param in walk(command, "keyedge")
        if getattr(getattr(param, "type_descriptor", None), "annotation", None) in (int, int | None, list[int])
        and param.type_descriptor.parameter_info.max is None
    ]
    assert not unbounded, unbounded
    for args in (
        ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--batch-size", 10**20, "-o", "x"],
        ["train", "-m", "test_efficientnet", "-d", "fashion-mnist", "--image-size", 10**11, "-o", "x"],
        ["fleet", "init", "f", "-n", 10**20, "-m", "test_efficientnet", "-d", "fashion-mnist"],
        ["bench", "latency", "x", "--batch", 10**20],
    ):
        result = run(*args)
        assert result.exit_code == 2 and "less than or equal to" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _note_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("note: --force")]


@pytest.mark.parametrize(
    "command",
    [
        ["key", "new", "-b", 4],
        ["keygen", "-b", 4],
        ["key", "import-seed", 7, "-b", 4],
        ["sealkey", "new"],
        ["signkey", "new"],
    ],
)
def test_old_force_still_replaces_with_one_note(tmp_path, command):
    out = tmp_path / "k.bin"
    assert run(*command, "-o", out).exit_code == 0
    assert_clean_error(run(*command, "-o", out), "already exists", "--overwrite")
    result = run(*command, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert _note_lines(result) == ["note: --force is now --overwrite; --force will be removed in the next release"], (
        result.stderr
    )
    assert run(*command, "-o", out, "--overwrite").exit_code == 0


def test_old_force_on_shuffle(tmp_path, photo, keyfile):
    out = tmp_path / "s.png"
    assert run("shuffle", photo, "-k", keyfile, "-o", out).exit_code == 0
    result = run("shuffle", photo, "-k", keyfile, "-o", out, "--force")
    assert result.exit_code == 0 and len(_note_lines(result)) == 1, result.output


def test_help_tells_the_truth():
    """Help lines that were false once: the quickstart trains full fine-tunes, bench also attacks, .pub beside OUT."""
    top = " ".join(run("--help").stdout.split())
    assert "keyed full fine-tunes" in top and "LoRA" not in top
    assert "robustness" in top  # the bench group is more than latency
    commands = dict(all_commands())
    (out,) = [p for p in commands["signkey new"].params if p.name == "out"]
    assert "suffix .pub" in out.help
    for path in ("bench latency", "bench robustness"):  # the one report-output convention, said in both
        assert "--out DIR" in commands[path].epilog and "<name>.json" in commands[path].epilog, path


def test_keygen_is_the_old_name_of_key_new(tmp_path):
    top = run("--help").stdout
    assert "keygen" not in top and "key " in top
    assert "Old name of `keyedge key new`" in run("keygen", "--help").stdout
    result = run("keygen", "-b", 8, "-o", tmp_path / "k.bin")
    assert result.exit_code == 0 and result.stderr == "", result.output  # works as before, no note
    assert load_key(tmp_path / "k.bin").block_size == 8


@pytest.mark.parametrize(
    ("args", "new_flag"),
    [
        (["bench", "latency", "artifacts/x", "--device", "devices/cpu-x86.toml"], "--profile"),
        (["bench", "latency", "artifacts/x", "-d", "devices/cpu-x86.toml"], "--profile"),
        (["bench", "latency", "artifacts/x", "--device", "cuda"], "--profile"),
        (["bench", "regress", "--current", "c.json", "--device", "devices/cpu-x86.toml"], "--profile"),
        (["bench", "regress", "--current", "c.json", "-d", "devices/cpu-x86.toml"], "--profile"),
        (["export", "-c", "runs/x", "-k", "k.bin", "--force"], "--allow-key-mismatch"),
    ],
)
def test_old_flag_spellings_name_the_new_one(tmp_path, monkeypatch, args, new_flag):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run(*args), new_flag)
    assert listing(tmp_path) == []  # refused before any work


def test_old_gate_profile_flag_names_the_new_one(capsys):
    from keyedge.benchmarks.gate import main

    assert main(["--device", "devices/ci-cpu.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "--profile" in err
