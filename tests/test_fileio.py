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
