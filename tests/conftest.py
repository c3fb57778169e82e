"""Shared fixtures: fixed keys (deterministic secrets) and a temporary working directory."""

from __future__ import annotations

import pytest

from keyedge.keys.keyfile import Key


@pytest.fixture
def key4() -> Key:
    return Key.from_secret(bytes(range(32)), 4)


@pytest.fixture
def make_key():
    def make(block_size: int, channels: int = 3, tag: int = 7) -> Key:
        return Key.from_secret(bytes([tag]) * 32, block_size, channels)

    return make
