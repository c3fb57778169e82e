"""The device side of a posture: a stateful query guard and a rate limit, around any runner.

The device runtime (:mod:`keyedge.deploy.runtime`) applies it; the robustness harness runs the same guard in
front of the models it attacks, so what is measured is what is deployed.

**Query guard** (in the spirit of Blacklight, Li et al., USENIX Security 2022): a query-based attacker sends
many near-identical images.  Each query is quantized (0..255 values floored to multiples of ``quantum``),
flattened in height-width-channel order, cut into windows of ``window`` values every ``step`` values, and
each window hashed; the ``hashes`` largest hashes are the query's fingerprint.  A query is *flagged* when
at least ``threshold`` of its fingerprint was seen in one earlier query of the bounded ``history``.  Then
the ``action`` applies: ``refuse`` (no answer to this query), ``lock`` (this query is the last one answered:
none after it until an operator unlocks the guard) or ``flag`` (answer, and record it).  ``lock`` and ``flag``
never hold a query up: a device answers at once and inspects the query beside the model (:class:`Guarded`).

Hashes are keyed with a per-device secret (a 64-bit multiply-and-mix of each window with secret odd
multipliers, vectorized in numpy): an attacker without the device's guard state cannot predict them.

**Rate limit**: at most ``rate`` queries per minute per device (sliding window); a query beyond it is refused.

**State** (history, lock, counters, the guard's secret) is persisted atomically to ``state`` after every
query that changes it (``autosave``), and read back at start: a restart does not forget an attack in
progress.  A state file that is corrupt, from another guard configuration or another device (``owner``)
is refused with one line -- never trusted silently, never replaced without ``--overwrite``.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyedge.errors import KeyedgeError
from keyedge.fileio import write_bytes_atomic

STATE_SCHEMA = "keyedge-guard/1"
ACTIONS = ("refuse", "lock", "flag")


class GuardError(KeyedgeError):
    """A guard state file or setting that cannot be used."""


@dataclass(frozen=True)
class GuardConfig:
    """How queries are fingerprinted and compared (defaults: Blacklight's ImageNet settings as OARS publishes them)."""

    window: int = 50  # values per hashed window of the flattened quantized image
    step: int = 25
    hashes: int = 50  # fingerprint size: the largest window hashes of a query
    quantum: int = 50  # quantization step on 0..255 values
    threshold: float = 0.5  # share of a query's fingerprint found in one earlier query that flags it
    history: int = 10_000  # queries remembered per device

    def __post_init__(self) -> None:
        ints = {"window": self.window, "step": self.step, "hashes": self.hashes, "quantum": self.quantum}
        for name, value in {**ints, "history": self.history}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GuardError(f"guard {name} must be a whole number >= 1, got {value!r}")
        if self.quantum > 255:
            raise GuardError(f"guard quantum must be 1..255, got {self.quantum}")
        if not 0 < self.threshold <= 1:
            raise GuardError(f"guard threshold must be in (0, 1], got {self.threshold!r}")

    @property
    def needed(self) -> int:
        """Matching hashes that flag a query."""
        return max(1, int(np.ceil(self.threshold * self.hashes)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What the guard decided for one query."""

    answered: bool
    flagged: bool = False
    reason: str | None = None  # why it was refused or flagged
    matches: int = 0  # the most fingerprint hashes shared with one earlier query


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64's): spreads the bits of a multiply-add hash."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _largest_distinct(values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest distinct values, ascending (``np.unique(values)[-k:]``, without sorting them all)."""
    pool = min(values.size, 4 * k)
    if pool < values.size:
        top = np.unique(np.partition(values, values.size - pool)[-pool:])
        if top.size >= k:
            return top[-k:]
    return np.unique(values)[-k:]


@dataclass
class _State:
    secret: bytes
    queries: int = 0  # every query checked, answered or not
    flagged: int = 0
    refused: int = 0
    locked: bool = False
    next_id: int = 0
    history: deque = field(default_factory=deque)  # (query id, fingerprint as uint64 array)
    recent: deque = field(default_factory=deque)  # times of answered queries in the last minute (rate limit)


class QueryGuard:
    """Fingerprint each query, flag attack sequences, apply the action; optionally rate-limit and persist."""

    def __init__(
        self,
        config: GuardConfig | None = None,
        action: str | None = "refuse",
        *,
        rate: int | None = None,
        state: str | Path | None = None,
        owner: str = "",
        autosave: bool = True,
        save_interval: float = 0.0,
        clock: Callable[[], float] = time.time,
    ):
        if action is not None and action not in ACTIONS:
            raise GuardError(f"unknown guard action {action!r}", f"use {', '.join(ACTIONS)}")
        self.config = config or GuardConfig()
        self.action, self.rate, self.owner, self.autosave, self.clock = action, rate, owner, autosave, clock
        self.path = Path(state) if state is not None else None
        # autosave at most every save_interval seconds (0: after every query); a lock is saved at once
        self.save_interval, self._saved_at = float(save_interval), -float("inf")
        self._state = self._load() if self.path is not None and self.path.exists() else _State(secrets.token_bytes(32))
        self._multipliers = self._derive(self._state.secret)
        self._table: dict[int, list[int]] = {}
        for qid, fingerprint in self._state.history:
            self._index(qid, fingerprint)

    # -- fingerprints ---------------------------------------------------------------------------------------------

    def _derive(self, secret: bytes) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.frombuffer(secret, dtype=np.uint64)))
        return rng.integers(0, 2**63, size=self.config.window, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def fingerprint(self, image: np.ndarray) -> np.ndarray:
        """The query's fingerprint: the ``hashes`` largest distinct keyed window hashes (uint64)."""
        x = np.asarray(image, dtype=np.float32)
        if x.ndim != 3:
            raise GuardError(f"the guard fingerprints one (C, H, W) image at a time, got shape {x.shape}")
        scaled = np.nan_to_num(x.transpose(1, 2, 0) * 255)  # a NaN pixel (an attacker's malformed query) reads as 0
        quantized = np.rint(scaled).clip(0, 255).astype(np.uint8) // self.config.quantum
        flat = quantized.reshape(-1).astype(np.uint64)
        w, step = min(self.config.window, flat.size), self.config.step
        with np.errstate(over="ignore"):
            if w % step == 0 and w == self.config.window:  # each window is w // step whole blocks: hash the blocks
                k = w // step
                count = (flat.size - w) // step + 1  # windows, as sliding_window_view(flat, w)[::step] has them
                blocks = flat[: (count + k - 1) * step].reshape(-1, step)
                parts = blocks @ self._multipliers[:w].reshape(k, step).T  # (blocks, k): block i as part j
                sums = sum(parts[j : j + count, j] for j in range(k))  # window i = blocks i..i+k-1, mod 2**64
            else:
                sums = np.lib.stride_tricks.sliding_window_view(flat, w)[::step] @ self._multipliers[:w]
            hashes = _mix(sums)
        return _largest_distinct(hashes, self.config.hashes)

    def _index(self, qid: int, fingerprint: np.ndarray) -> None:
        for h in fingerprint.tolist():
            self._table.setdefault(h, []).append(qid)

    def _forget_oldest(self) -> None:
        qid, fingerprint = self._state.history.popleft()
        for h in fingerprint.tolist():
            ids = self._table.get(h)
            if ids:
                ids.remove(qid)
                if not ids:
                    del self._table[h]

    def _matches(self, fingerprint: np.ndarray) -> int:
        table = self._table
        hits = [table[h] for h in fingerprint.tolist() if h in table]
        if not hits:  # the common case for a benign query: none of its hashes was seen
            return 0
        counts = Counter(qid for ids in hits for qid in ids)
        return max(counts.values())

    # -- checking queries -------------------------------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        return self._state.locked

    @property
    def counters(self) -> dict[str, int]:
        s = self._state
        return {"queries": s.queries, "flagged": s.flagged, "refused": s.refused, "history": len(s.history)}

    def unlock(self) -> None:
        """An operator's decision: answer queries again (the history is kept)."""
        self._state.locked = False
        self._save(urgent=True)

    def check(self, image: np.ndarray) -> Verdict:
        """Decide one query (a ``(C, H, W)`` image in [0, 1]) and remember it: :meth:`admit`, then :meth:`inspect`."""
        refused = self.admit()
        return refused if refused is not None else self.inspect(image)

    def admit(self) -> Verdict | None:
        """The cheap part of a decision, before the model runs: a refusal when locked or over the rate, else None."""
        s = self._state
        s.queries += 1
        now = self.clock()
        if s.locked:
            return self._refuse("locked after an attack was detected; an operator must unlock it")
        if self.rate is not None:
            while s.recent and now - s.recent[0] >= 60.0:
                s.recent.popleft()
            if len(s.recent) >= self.rate:
                return self._refuse(f"rate limit: {self.rate} queries per minute")
            s.recent.append(now)
        return None

    def inspect(self, image: np.ndarray) -> Verdict:
        """The query's fingerprint against the history, and the action.

        ``refuse`` refuses a flagged query; ``lock`` answers it (a device may have answered it already, see
        :class:`Guarded`) and refuses every query after it until :meth:`unlock`; ``flag`` answers and records.
        """
        s = self._state
        if self.action is None:
            self._save()
            return Verdict(True)
        fingerprint = self.fingerprint(image)
        matches = self._matches(fingerprint)
        s.history.append((s.next_id, fingerprint))
        self._index(s.next_id, fingerprint)
        s.next_id += 1
        while len(s.history) > self.config.history:
            self._forget_oldest()
        if matches < self.config.needed:
            self._save()
            return Verdict(True, matches=matches)
        s.flagged += 1
        reason = f"attack query sequence: {matches} of {len(fingerprint)} hashes seen in one earlier query"
        if self.action == "refuse":
            return self._refuse(reason, matches)
        if self.action == "lock":
            s.locked = True
        self._save(urgent=self.action == "lock")
        return Verdict(True, flagged=True, reason=reason, matches=matches)

    def check_batch(self, images: Sequence[np.ndarray] | np.ndarray) -> list[Verdict]:
        """One verdict per image, in order (each image is one query)."""
        return [self.check(image) for image in images]

    def _refuse(self, reason: str, matches: int = 0, *, urgent: bool = False) -> Verdict:
        self._state.refused += 1
        self._save(urgent=urgent)
        return Verdict(False, flagged=matches > 0, reason=reason, matches=matches)

    # -- state ------------------------------------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {"schema": STATE_SCHEMA, "owner": self.owner, "config": self.config.to_dict()}

    def to_bytes(self) -> bytes:
        """The whole state as one ``.npz`` archive (a JSON header, counters, history, the secret)."""
        s = self._state
        ids = np.array([qid for qid, _ in s.history], dtype=np.int64)
        prints = [fp for _, fp in s.history]
        lengths = np.array([len(fp) for fp in prints], dtype=np.int64)
        flat = np.concatenate(prints) if prints else np.zeros(0, dtype=np.uint64)
        counters = np.array([s.queries, s.flagged, s.refused, int(s.locked), s.next_id], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            header=np.frombuffer(json.dumps(self._header(), sort_keys=True).encode(), dtype=np.uint8),
            secret=np.frombuffer(s.secret, dtype=np.uint8),
            counters=counters,
            ids=ids,
            lengths=lengths,
            hashes=flat.astype(np.uint64),
            recent=np.array(list(s.recent), dtype=np.float64),
        )
        return buffer.getvalue()

    def save(self) -> None:
        """Write the state to ``state`` atomically (nothing half-written survives a crash)."""
        if self.path is not None:
            write_bytes_atomic(self.path, self.to_bytes(), mode=0o600, overwrite=True)
            self._saved_at = self.clock()

    def _save(self, *, urgent: bool = False) -> None:
        if self.autosave and (urgent or self.clock() - self._saved_at >= self.save_interval):
            self.save()

    def _load(self) -> _State:
        path = self.path
        assert path is not None
        hint = "delete it to start the guard afresh (its history is lost), or point --guard-state at this device's file"
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                arrays = {k: data[k] for k in ("secret", "counters", "ids", "lengths", "hashes", "recent")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RecursionError) as exc:
            raise GuardError(
                f"guard state {path} is corrupt or not a guard state ({type(exc).__name__})", hint
            ) from None
        if not isinstance(header, dict) or header.get("schema") != STATE_SCHEMA:
            raise GuardError(f"guard state {path} is not a {STATE_SCHEMA} file", hint)
        if header.get("owner") != self.owner:
            raise GuardError(f"guard state {path} belongs to another device or artifact", hint)
        if header.get("config") != self.config.to_dict():
            raise GuardError(f"guard state {path} was written with other guard settings", hint)
        counters, lengths, hashes = arrays["counters"], arrays["lengths"], arrays["hashes"]
        if counters.shape != (5,) or lengths.sum() != hashes.size or len(lengths) != len(arrays["ids"]):
            raise GuardError(f"guard state {path} is corrupt (its arrays disagree)", hint)
        if arrays["secret"].size != 32:
            raise GuardError(f"guard state {path} is corrupt (no secret)", hint)
        state = _State(arrays["secret"].tobytes())
        state.queries, state.flagged, state.refused, locked, state.next_id = (int(v) for v in counters)
        state.locked = bool(locked)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, qid in enumerate(arrays["ids"].tolist()):
            state.history.append((qid, hashes[offsets[i] : offsets[i + 1]].astype(np.uint64)))
        state.recent.extend(arrays["recent"].tolist())
        return state


class Guarded:
    """Any runner (anything with ``predict(images) -> (N, classes) outputs``) behind a :class:`QueryGuard`.

    Each image is one query; a refused query's row is NaN, so a caller (or an attack harness that counts refused
    queries as spent) sees no information in it.  Before the model runs, :meth:`QueryGuard.admit` refuses what a
    lock or the rate limit refuses.  Then, for ``refuse``, the query is inspected before it is answered (the
    decision is per query); for ``lock`` and ``flag`` it is answered at once and inspected on a thread of its
    own, beside the model and the caller's next work: the next query waits only for that inspection to finish,
    so a lock still takes effect from the query after the flagged one, and the guard adds almost nothing to a
    query's latency where a core is free.  Called like the runner (``guarded(images)``, ``.predict(images)``)
    it keeps the verdicts in :attr:`verdicts` (provisional for an inspection still running); everything else
    is the runner's.
    """

    def __init__(self, runner: Any, guard: QueryGuard, classes: int, *, background: bool | None = None):
        self.runner, self.guard, self.classes = runner, guard, classes
        self.verdicts: list[Verdict] = []
        self.background = guard.action in ("lock", "flag") if background is None else background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="keyedge-guard") if self.background else None
        self._pending: Any = None  # the previous query's inspection, running in the background
        self._lock = threading.Lock()  # one query batch at a time: the guard's history is ordered

    def answer(self, images: np.ndarray) -> tuple[np.ndarray, list[Verdict]]:
        """(outputs, verdicts): outputs ``(N, classes)`` with NaN rows where the guard refused."""
        images = np.asarray(images, dtype=np.float32)
        with self._lock:
            self._settle()
            verdicts: list[Verdict | None] = [self.guard.admit() for _ in images]
            admitted = [i for i, v in enumerate(verdicts) if v is None]
            if self.background:
                inspected = images[admitted].copy()
                self._pending = self._pool.submit(lambda: [self.guard.inspect(im) for im in inspected])
                for i in admitted:
                    verdicts[i] = Verdict(True)
            else:
                for i in admitted:
                    verdicts[i] = self.guard.inspect(images[i])
            keep = np.array([v.answered for v in verdicts], dtype=bool)
            out = np.full((len(images), self.classes), np.nan, dtype=np.float32)
            if keep.any():
                out[keep] = np.asarray(self.runner.predict(images[keep]), dtype=np.float32)
            self.verdicts = verdicts
        return out, verdicts

    def _settle(self) -> None:
        """Wait for the previous query's inspection (its lock applies from this query on)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.answer(images)[0]

    def predict(self, images: np.ndarray, **_ignored: Any) -> np.ndarray:
        return self.answer(images)[0]

    def __getattr__(self, name: str) -> Any:  # the runner's path, batch, describe(), ...
        if name in ("runner", "_pool", "_lock", "_pending"):
            raise AttributeError(name)
        return getattr(self.runner, name)

    def close(self) -> None:
        with self._lock:
            self._settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.guard.save()
        self.runner.close()

    def __enter__(self) -> Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
