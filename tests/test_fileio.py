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
    with pytest.raises(OutputError, match="--overwrite"):
        write_bytes_atomic(tmp_path / "a", b"2")
    with pytest.raises(OutputError, match="is a file"):
        write_bytes_atomic(tmp_path / "a" / "b", b"2")
    with pytest.raises(OutputError, match="does not exist"):
        write_bytes_atomic(tmp_path / "no" / "b", b"2")
    with pytest.raises(OutputError, match=r"cannot use output path .* too long"):
        write_bytes_atomic(tmp_path / ("x" * 300), b"2")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a dangling symlink is an existing output too
    with pytest.raises(OutputError, match="--overwrite"):
        write_bytes_atomic(tmp_path / "link", b"2")
    assert (tmp_path / "a").read_bytes() == b"1" and not (tmp_path / "nowhere").exists()


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


def _dead_pid() -> str:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_stale_staging_of_a_live_process_is_never_removed_and_a_dead_ones_is_said(tmp_path):
    import os

    from keyedge.fileio import remove_stale_staging

    dead_pid = _dead_pid()
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    dead = tmp_path / f".out.tmp-{dead_pid}-def"
    other = tmp_path / f".other.tmp-{dead_pid}-xyz"
    key_tmp = tmp_path / f".k1.bin.tmp-{dead_pid}-q1w2e3.tmp.bin"  # a killed keygen's half-written key
    live_tmp = tmp_path / f".k2.bin.tmp-{os.getpid()}-q1w2e3.tmp.bin"
    for d in (live, dead, other):
        d.mkdir()
    key_tmp.write_bytes(b"secret")
    live_tmp.write_bytes(b"secret")
    (tmp_path / ".not-ours").mkdir()
    said = remove_stale_staging(tmp_path)
    assert live.exists() and live_tmp.exists() and (tmp_path / ".not-ours").exists()
    assert not dead.exists() and not other.exists() and not key_tmp.exists()
    assert len(said) == 3 and all(f"killed keyedge process (pid {dead_pid})" in line for line in said), said


def test_an_output_renamed_aside_by_a_killed_writer_is_put_back(tmp_path):
    from keyedge.fileio import remove_stale_staging, staged_directory

    dead_pid = _dead_pid()
    old = tmp_path / f".report.old-{dead_pid}-a1b2c3"  # killed between the two renames of a replace
    old.mkdir()
    (old / "a.txt").write_text("previous")
    said = []
    with staged_directory(tmp_path / "other", overwrite=False, log=said.append) as staging:
        (staging / "x").write_text("x")
    assert (tmp_path / "report" / "a.txt").read_text() == "previous" and not old.exists()
    assert said and "restored" in said[0]
    # once the new output is in place, a leftover old copy is simply removed
    (tmp_path / f".report.old-{dead_pid}-d4e5f6").mkdir()
    assert "removed" in remove_stale_staging(tmp_path)[0] and (tmp_path / "report" / "a.txt").exists()


def test_a_failed_staged_directory_removes_the_parents_it_made(tmp_path):
    from keyedge.fileio import staged_directory

    with pytest.raises(KeyboardInterrupt), staged_directory(tmp_path / "a" / "b" / "out", overwrite=False):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_stop_swallowed_by_a_library_still_stops_the_commit(tmp_path):
    """CPython drops a KeyboardInterrupt raised inside a weakref callback: the recorded stop still blocks commits."""
    from keyedge.fileio import ask_stop, forget_stops, staged_directory, write_bytes_atomic

    ask_stop(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_directory(tmp_path / "set", overwrite=False) as staging:
                (staging / "model.bin").write_bytes(b"x")  # the converter finished, the interrupt was lost
        with pytest.raises(KeyboardInterrupt):
            write_bytes_atomic(tmp_path / "file.bin", b"x")
        assert list(tmp_path.iterdir()) == []
    finally:
        forget_stops()
    write_bytes_atomic(tmp_path / "file.bin", b"x")  # a new command commits again


def test_replacing_an_output_that_is_a_symlink_replaces_the_link_and_leaves_nothing(tmp_path):
    """Issue 33: rmtree refuses a link, quietly: an --overwrite of a set that was a symlink left ``.NAME.old-*``."""
    from keyedge.fileio import remove_stale_staging, staged_directory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("not keyedge's")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "set").symlink_to(elsewhere)
    with staged_directory(tmp_path / "out" / "set", overwrite=True) as staging:
        (staging / "model.onnx").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["set"]  # no hidden leftover
    assert not (tmp_path / "out" / "set").is_symlink() and (tmp_path / "out" / "set" / "model.onnx").exists()
    assert (elsewhere / "mine.txt").read_text() == "not keyedge's"  # the link's target is not ours to delete
    # a link renamed aside by a writer killed before the new set was in place is put back; after, removed
    dead_pid = _dead_pid()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / f".set.old-{dead_pid}-a1b2c3").symlink_to(elsewhere)
    assert "restored" in remove_stale_staging(tmp_path / "b")[0] and (tmp_path / "b" / "set").is_symlink()
    (tmp_path / "b" / f".set.old-{dead_pid}-d4e5f6").symlink_to(elsewhere)
    assert "removed" in remove_stale_staging(tmp_path / "b")[0]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["set"] and (elsewhere / "mine.txt").exists()
