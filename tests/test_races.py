"""Secret files are created exclusively: of processes racing to create the same key file, exactly one wins (issue 33).

The old writer checked that the name was free, then renamed its file onto it: two processes could
both check, both rename and both say ``wrote``, and one key -- perhaps already given to a device --
was silently gone.  Here real processes (forked, released together by a barrier, and ``keyedge``
command lines started together) race for one name many times; every round must have exactly one
winner, the file on disk must be the winner's, and the losers must leave nothing behind.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyedge.errors import OutputError

ROUNDS = int(os.environ.get("KEYEDGE_RACE_ROUNDS", "30"))  # more: KEYEDGE_RACE_ROUNDS=1000 pytest tests/test_races.py
RACERS = 3


def _create(kind: str, path: Path) -> bytes:
    """Create ``kind`` at ``path`` as the library does; return the bytes this process wrote."""
    if kind == "key":
        from keyedge.keys.keyfile import Key

        key = Key.generate(4)
        key.save(path)
        return key.to_bytes()
    if kind == "sealkey":
        from keyedge.keys.seal import SealKey

        key = SealKey.generate()
        key.save(path)
        return key.to_bytes()
    from keyedge.keys.signing import SigningKey

    key = SigningKey.generate()
    key.save_pair(path)
    return key.to_bytes() + key.verify_key().to_bytes()


def _racer(kind: str, path: str, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(("won", _create(kind, Path(path))))
    except OutputError as exc:
        results.put(("lost", str(exc).encode()))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(("crashed", repr(exc).encode()))


def _on_disk(kind: str, path: Path) -> bytes:
    if kind == "signkey":
        return path.read_bytes() + path.with_suffix(".pub").read_bytes()
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["key", "sealkey", "signkey"])
def test_racing_processes_never_both_create_a_secret_file(tmp_path, kind):
    ctx = multiprocessing.get_context("fork")
    double = 0
    for round_ in range(ROUNDS):
        path = tmp_path / f"r{round_}" / "k.bin"
        path.parent.mkdir()
        barrier, results = ctx.Barrier(RACERS), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(kind, str(path), barrier, results)) for _ in range(RACERS)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert not [o for o in outcomes if o[0] == "crashed"], outcomes
        winners = [data for verdict, data in outcomes if verdict == "won"]
        double += len(winners) > 1
        assert len(winners) >= 1, outcomes
        assert _on_disk(kind, path) in winners  # the file is a winner's, whole
        expected = {"k.bin", "k.pub"} if kind == "signkey" else {"k.bin"}
        assert {p.name for p in path.parent.iterdir()} == expected  # no temporary file left by a loser
    assert double == 0, f"{double} of {ROUNDS} rounds had more than one process say it created {kind}"


COMMANDS = {"key": ["key", "new"], "sealkey": ["sealkey", "new"], "signkey": ["signkey", "new"]}


@pytest.mark.parametrize("kind", ["key", "sealkey", "signkey"])
def test_racing_command_lines_never_both_say_wrote(tmp_path, kind):
    """The same, as users run it: ``keyedge sealkey new -o same`` started together; one ``wrote``, the rest exit 2."""
    rounds, double = max(2, ROUNDS // 30), 0
    for round_ in range(rounds):
        out = tmp_path / f"k{round_}.key"
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "keyedge", *COMMANDS[kind], "-o", str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(RACERS)
        ]
        done = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        wrote = [d for d in done if d[0] == 0]
        double += len(wrote) > 1
        assert len(wrote) >= 1, done
        for rc, _stdout, stderr in done:
            if rc:
                assert rc == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert double == 0, f"{double} of {rounds} rounds had two processes say they wrote the key"


def test_a_signing_key_is_never_left_without_its_verify_key(tmp_path):
    """``signer.pub`` exists already: nothing is written, not even the private key (it was left behind before)."""
    from keyedge.keys.signing import SigningKey

    (tmp_path / "signer.pub").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="already exists"):
        SigningKey.generate().save_pair(tmp_path / "signer.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer.pub"]
    with pytest.raises(OutputError, match=r"ends in \.pub"):
        SigningKey.generate().save_pair(tmp_path / "other.pub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer.pub"]
