"""Property-based: whatever bytes the key-file reader gets, it raises only KeyFileError (or parses)."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyedge.errors import KeyFileError
from keyedge.keys.keyfile import CHECKSUM_SIZE, MAGIC, Key

VALID = [
    Key.from_secret(bytes(range(32)), 4).to_bytes(),
    Key.from_seed(1234, 2).to_bytes(),
    Key.from_secret(bytes(32), 1, derangement=False).to_bytes(),
]


def _parse(data: bytes) -> None:
    try:
        key = Key.from_bytes(data)
    except KeyFileError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:  # anything accepted must be a consistent key
        assert sorted(key.permutation.tolist()) == list(range(key.size))
        assert Key.from_bytes(key.to_bytes()) == key


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _parse(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_after_magic(data):
    _parse(MAGIC + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_files(valid, data):
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "extend", "delete"]))
        if op in ("flip", "set") and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = raw[i] ^ 0xFF if op == "flip" else data.draw(st.integers(0, 255))
        elif op == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        elif op == "extend":
            raw += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1))]
    _parse(bytes(raw))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(8, 19), st.integers(0, 255)), min_size=1, max_size=6),
    st.binary(max_size=64),
)
def test_resealed_header_mutations(valid, edits, payload_tail):
    """Mutations that carry a *valid* checksum reach the field validation: still only KeyFileError."""
    body = bytearray(valid[:-CHECKSUM_SIZE])
    for index, value in edits:
        body[index] = value
    body += payload_tail
    _parse(bytes(body) + hashlib.sha256(bytes(body)).digest())
