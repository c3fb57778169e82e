"""Atomic output: a failure while writing leaves neither a partial file nor a temporary one."""

from __future__ import annotations

import stat

import pytest

from keyedge.errors import OutputError
from keyedge.fileio import atomic_output, write_bytes_atomic


def test_failure_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"bad")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_secret_mode_from_the_start(tmp_path):
    with atomic_output(tmp_path / "k.bin", mode=0o600) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # never readable by others, even briefly
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "k.bin").stat().st_mode) == 0o600


def test_refuses_existing_and_bad_parents(tmp_path):
    write_bytes_atomic(tmp_path / "a", b"1")
    with pytest.raises(OutputError, match="--force"):
        write_bytes_atomic(tmp_path / "a", b"2")
    with pytest.raises(OutputError, match="does not exist"):
        write_bytes_atomic(tmp_path / "a" / "b", b"2")
    assert (tmp_path / "a").read_bytes() == b"1"


def test_staged_directory_replaces_only_when_complete(tmp_path):
    from keyedge.fileio import staged_directory

    final = tmp_path / "report"
    with staged_directory(final, overwrite=False) as staging:
        (staging / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), staged_directory(final, overwrite=True) as staging:
        (staging / "a.txt").write_text("two")
        assert (final / "a.txt").read_text() == "one", "the old directory stays while the new one is written"
        raise RuntimeError("killed half-way")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with staged_directory(final, overwrite=True) as staging:
        (staging / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "no .old or .tmp directory left behind"
    with pytest.raises(OutputError, match="already exists"), staged_directory(final, overwrite=False):
        pass


def test_stale_staging_of_a_live_process_is_never_removed(tmp_path):
    import os
    import subprocess
    import sys

    from keyedge.fileio import remove_stale_staging

    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dead = tmp_path / f".out.tmp-{dead_pid}-def"
    other = tmp_path / f".other.tmp-{dead_pid}-xyz"
    for d in (live, dead, other):
        d.mkdir()
    remove_stale_staging(tmp_path, "out")
    assert live.exists() and not dead.exists() and other.exists()
