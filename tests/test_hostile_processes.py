"""Promises kept by a real ``keyedge`` process (issue 19): signals, kill -9, full and read-only file systems.

Each case runs ``python -m keyedge`` in a subprocess, as a user's shell would, and checks the
three promises: one line on stderr (never a traceback), a non-zero exit, and no partial output
-- or, when a command is stopped, a truthful account of what it kept.  Full and read-only disks
are tiny tmpfs mounts in a private mount namespace (``unshare``); where the host does not allow
one, those cases are skipped with the reason.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KEYEDGE = [sys.executable, "-m", "keyedge"]


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + (proc.stdout or ""), proc.stderr
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), line
    return line


def _visible_and_hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


def _export_cmd(small_keyed_checkpoint, out: Path, *targets: str) -> list[str]:
    ckpt, key_file = small_keyed_checkpoint
    return [*KEYEDGE, "export", "-c", str(ckpt), "-k", str(key_file), "-o", str(out)] + [
        a for t in targets or ("onnx",) for a in ("-t", t)
    ]


def _ctrl_c_as_from_a_terminal() -> None:
    """In the child: SIGINT at its default, as a terminal's Ctrl-C finds it.

    A test run started as a shell's background job (``cmd &`` without job control) ignores SIGINT, and
    every process it starts inherits that: the command under test would rightly ignore Ctrl-C too.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for(cmd: list[str], marker: str, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` and return once its output shows ``marker`` (the process is then mid-work)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=_ctrl_c_as_from_a_terminal,
    )
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return proc
        assert time.monotonic() < deadline, seen
    proc.wait()
    raise AssertionError(f"{marker!r} never appeared: {''.join(seen)}")


# ---- signals -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGINT: the training case below
def test_a_stopped_export_stops_promptly_and_leaves_nothing(small_keyed_checkpoint, tmp_path, signum):
    out = tmp_path / "out"
    proc = _start_and_wait_for(_export_cmd(small_keyed_checkpoint, out, "onnx", "openvino"), "onnx: exporting")
    proc.send_signal(signum)
    started = time.monotonic()
    rest = proc.communicate(timeout=120)[0]
    assert time.monotonic() - started < 60, "the export did not stop promptly"
    assert proc.returncode == 128 + signum, (proc.returncode, rest)
    assert "Traceback" not in rest and "wrote " not in rest, rest
    assert "nothing was written" in rest.strip().splitlines()[-1], rest
    assert _visible_and_hidden(out) == [], "no artifact, staging directory or empty parent is left"


@pytest.mark.slow
def test_an_interrupted_training_says_which_checkpoint_it_kept(tmp_path):
    out = tmp_path / "run"
    cmd = [*KEYEDGE, "train", "-m", "test_resnet", "--weights", "none", "-d", "fashion-mnist", "--image-size", "32"]
    cmd += ["--epochs", "50", "--train-limit", "600", "--test-limit", "50", "-o", str(out)]
    proc = _start_and_wait_for(cmd, "epoch 2/50")  # logged before its save: epoch 1 is on disk
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "nothing was written" not in last, last
    assert f"{out} (checkpoint after epoch" in last and "--resume" in last, last
    from keyedge.checkpoints import read_manifest

    epoch = read_manifest(out).epoch  # the kept checkpoint is complete and is the one the message names
    assert f"checkpoint after epoch {epoch};" in last
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["keyedge.json", "state", "weights"]


# kill -9 mid-export, cleaned and said by the next export: tests/test_export.py::test_killed_export_leaves_no_artifact


# ---- full and read-only file systems ------------------------------------------------------------------------------


def _unshare_works() -> str:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
        capture_output=True,
        text=True,
    )
    return "" if probe.returncode == 0 else f"no private tmpfs mounts here: {probe.stderr.strip()[:80]}"


needs_mounts = pytest.mark.skipif(bool(_unshare_works()), reason=_unshare_works() or "mounts work")


def _on_small_fs(mount: Path, cmd: list[str], *, size: str, full=False, read_only=False):
    """Run ``cmd`` with a fresh ``size`` tmpfs at ``mount`` (filled up, or read-only) that only it sees."""
    mount.mkdir(exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs '{mount}' && mkdir '{mount}/d'"
    if full:
        script += f" && (dd if=/dev/zero of='{mount}/fill' bs=4k 2>/dev/null; true)"
    if read_only:
        script += f" && mount -o remount,ro '{mount}'"
    script += ' && "$@"; rc=$?; echo "left: $(ls -A ' + f"'{mount}/d'" + ' | tr "\\n" " ")" >&2; exit $rc'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True)


def _split_left(proc: subprocess.CompletedProcess) -> tuple[subprocess.CompletedProcess, str]:
    """Separate the listing the wrapper appends (what the command left in the tmpfs) from its stderr."""
    lines = proc.stderr.rstrip("\n").splitlines()
    left = lines[-1].removeprefix("left: ").strip()
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, "\n".join(lines[:-1])), left


@needs_mounts
@pytest.mark.parametrize(
    "kind, fragment",
    [("full", "no space left on device"), ("read_only", "read-only file system")],
)
def test_key_new_on_a_full_or_read_only_disk(tmp_path, kind, fragment):
    mount = tmp_path / "mnt"
    proc = _on_small_fs(
        mount, [*KEYEDGE, "key", "new", "-b", "4", "-o", f"{mount}/d/k.bin"], size="256k", **{kind: True}
    )
    proc, left = _split_left(proc)
    line = _one_line_error(proc)
    assert fragment in line.lower() or "not writable" in line or "cannot write" in line, line
    assert left == "", f"a half-written key file was left: {left}"


@needs_mounts
def test_an_export_that_fills_the_disk_leaves_nothing(small_keyed_checkpoint, tmp_path):
    mount = tmp_path / "mnt"
    proc, left = _split_left(_on_small_fs(mount, _export_cmd(small_keyed_checkpoint, mount / "d" / "out"), size="160k"))
    _one_line_error(proc, "no space left on device")
    assert left == "", f"left behind: {left}"  # no artifact, no staging directory, not even the parent it made


@needs_mounts
def test_an_export_to_a_read_only_disk_fails_before_any_work(small_keyed_checkpoint, tmp_path):
    mount = tmp_path / "mnt"
    started = time.monotonic()
    proc, left = _split_left(
        _on_small_fs(mount, _export_cmd(small_keyed_checkpoint, mount / "d" / "out"), size="64k", read_only=True)
    )
    _one_line_error(proc, "read-only file system")
    assert left == "" and "exporting (gather)" not in proc.stdout, proc.stdout
    assert time.monotonic() - started < 120


def test_a_full_stdout_is_one_line_on_stderr(small_keyed_checkpoint):
    _, key_file = small_keyed_checkpoint
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*KEYEDGE, "key", "show", str(key_file)], stdout=full, stderr=subprocess.PIPE, text=True)
    _one_line_error(proc, "no space left on device")


def test_a_closed_stdout_pipe_is_not_a_traceback(small_keyed_checkpoint):
    _, key_file = small_keyed_checkpoint
    proc = subprocess.Popen([*KEYEDGE, "key", "show", str(key_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `keyedge key show k.bin | head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    # silent, non-zero (rich itself exits 1 on a broken pipe; a plain print() gets 141 from keyedge)
    assert err.strip() == "" and proc.returncode in (1, 141), (proc.returncode, err)
