"""Interleaved timing: several candidates timed side by side in rounds whose order is rotated each round.

On a shared machine the speed drifts (other processes, frequency scaling, thermal limits); timed one
after the other, two candidates see different machines.  Timed in short *rounds* -- every candidate's
turn once per round, the order rotated each round -- they see the same drift, and the ratio of their
times *within* a round cancels it.  Every benchmark of keyedge times this way (the latency harness and
the experiments, and ``export --fuse fastest``); :mod:`keyedge.stats` summarizes the per-round ratios (median,
10th-90th percentile).  It sits in the foundation layer so that export can time forms without the benchmarks.

    timing = interleave({"gather": lambda: gather(x), "chain": lambda: chain(x)}, rounds=30, warmup=3)
    print(timing.ratio("chain", "gather"))   # median [p10-p90] of the per-round chain/gather ratios

A run: each candidate is warmed up (``warmup`` untimed calls, the first of them timed alone: the first-call
latency), then rounds run until there are at least ``rounds`` of them and every candidate has at least
``min_iterations`` timed calls and ``min_seconds`` of timed calls.  A candidate's calls per round are
``calls``, or sized from its warm-up so that a round lasts about ``round_seconds`` (``min_seconds / rounds``
by default) and ``rounds`` rounds reach ``min_iterations``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keyedge.stats import Spread, ratio_spread

#: the untimed pause after each candidate's turn when the candidates are runtimes (the latency harness, ``--fuse
#: fastest``), so that the runtime's spinning threads park before the next cell
#: runs.  10 ms was too short: ONNX Runtime's idle threads still competed with the next cell, whose slowest tenth
#: of calls took ~1.8x its median (EfficientNet-Lite0 224, 2 threads, AMD EPYC) -- and the cell after an ONNX
#: Runtime one was usually a keyed one, inflating keyed/plain on ORT to 1.28 where 100 ms measures 1.05.
RUNTIME_COOLDOWN_S = 0.1


# --------------------------------------------------------------------------- data


@dataclass
class Rounds:
    """One candidate's timings: per round the calls made and their total seconds, and each call's seconds."""

    first_s: float | None = None  # the first (warm-up) call alone; None without warm-up
    calls: list[int] = field(default_factory=list)  # per round
    seconds: list[float] = field(default_factory=list)  # per round: the calls' total
    each: list[list[float]] = field(default_factory=list)  # per round, each call (empty when timed as a block)
    returned: list[Any] = field(default_factory=list)  # per round, the last call's result (``keep=True``)

    @property
    def means(self) -> list[float]:
        """Seconds per call, per round."""
        return [s / c for s, c in zip(self.seconds, self.calls)]

    @property
    def medians(self) -> list[float]:
        """Median seconds of a call, per round (calls timed one by one)."""
        return [statistics.median(e) for e in self.each]

    @property
    def samples(self) -> list[float]:
        """Every call's seconds, in order (calls timed one by one)."""
        return [s for e in self.each for s in e]

    @property
    def iterations(self) -> int:
        return sum(self.calls)

    @property
    def total_s(self) -> float:
        return sum(self.seconds)


@dataclass
class Timing:
    """Interleaved rounds of several candidates, by name, with what the run asked for."""

    candidates: dict[Hashable, Rounds]
    rounds: int = 0  # rounds run
    min_rounds: int = 1
    min_iterations: int = 0
    min_seconds: float = 0.0

    def __getitem__(self, name: Hashable) -> Rounds:
        return self.candidates[name]

    @property
    def done(self) -> bool:
        return self.rounds >= self.min_rounds and all(
            r.iterations >= self.min_iterations and r.total_s >= self.min_seconds for r in self.candidates.values()
        )

    @property
    def fraction(self) -> float:
        """How far the run is towards its minimums, 0 to 1 (for a progress bar)."""
        parts = [self.rounds / max(self.min_rounds, 1)]
        if self.min_iterations > 0:
            parts.append(min(r.iterations / self.min_iterations for r in self.candidates.values()))
        if self.min_seconds > 0:
            parts.append(min(r.total_s / self.min_seconds for r in self.candidates.values()))
        return min(1.0, *parts)

    def ratio(self, numerator: Hashable, denominator: Hashable, *, per: str = "means") -> Spread:
        """The spread of the per-round ratios ``numerator / denominator`` of seconds per call (``per``:
        ``"means"`` or ``"medians"`` of each round's calls)."""
        return ratio_spread(getattr(self[numerator], per), getattr(self[denominator], per))


# --------------------------------------------------------------------------- the loop


def _run(fn: Callable[[], Any], calls: int, each: bool, release: Callable[[Any], None] | None):
    """``calls`` calls of ``fn``: (total seconds, each call's seconds or [], the last result)."""
    result, times, total = None, [], 0.0
    if each or release is not None:
        for _ in range(calls):
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            if release is not None:
                release(result)
            times.append(elapsed)
            total += elapsed
        return total, times if each else [], result
    start = time.perf_counter()
    for _ in range(calls):
        result = fn()
    return time.perf_counter() - start, [], result


def _warm_up(fn: Callable[[], Any], warmup: int, release: Callable[[Any], None] | None) -> tuple[float | None, float]:
    """``warmup`` calls: (the first call's seconds, the estimated seconds per call from the others)."""
    if warmup < 1:
        return None, 0.0
    first, _, _ = _run(fn, 1, False, release)
    if warmup == 1:
        return first, first
    rest, _, _ = _run(fn, warmup - 1, False, release)
    return first, rest / (warmup - 1)


def interleave(
    candidates: Mapping[Hashable, Callable[[], Any]],
    *,
    rounds: int,
    calls: int | None = None,
    warmup: int = 1,
    min_iterations: int = 0,
    min_seconds: float = 0.0,
    round_seconds: float | None = None,
    each: bool = True,
    cooldown: float = 0.0,
    release: Callable[[Any], None] | None = None,
    keep: bool = False,
    progress: Callable[[Timing], None] | None = None,
) -> Timing:
    """Time ``candidates`` (name -> a call) in interleaved rounds, the order rotated each round.

    ``calls``: calls per candidate per round (None: sized from the warm-up, which then needs ``warmup >= 1``).
    ``each``: time every call on its own (per-call samples); False: one timer around a round's calls (for calls
    too short for a timer each).  ``cooldown``: untimed seconds of sleep after each candidate's turn.
    ``release``: called untimed on each call's result (close what a call opened).  ``keep``: record each
    round's last result.  ``progress``: called with the :class:`Timing` after each round.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if calls is None and warmup < 1:
        raise ValueError("calls per round are sized from the warm-up: give calls, or warmup >= 1")
    names = list(candidates)
    timing = Timing({name: Rounds() for name in names}, 0, rounds, min_iterations, min_seconds)
    per_round: dict[Hashable, int] = {}
    for name in names:
        first, estimate = _warm_up(candidates[name], warmup, release)
        timing[name].first_s = first
        if calls is not None:
            per_round[name] = calls
        else:
            budget = round_seconds if round_seconds is not None else min_seconds / rounds
            per_round[name] = max(1, math.ceil(min_iterations / rounds), int(budget / max(estimate, 1e-7)))
    while not timing.done:
        shift = timing.rounds % len(names)
        for name in names[shift:] + names[:shift]:
            total, times, result = _run(candidates[name], per_round[name], each, release)
            samples = timing[name]
            samples.calls.append(per_round[name])
            samples.seconds.append(total)
            samples.each.append(times)
            if keep:
                samples.returned.append(result)
            if cooldown:
                time.sleep(cooldown)
        timing.rounds += 1
        if progress is not None:
            progress(timing)
    return timing
