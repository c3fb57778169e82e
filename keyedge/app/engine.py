"""Where a fleet's per-key jobs run: on this machine, one after another, or as Ray tasks on a cluster.

A job is one key's step (train, export, verify, evaluate): a top-level function and its
keyword arguments, which must be plain data (paths, numbers, strings) -- never a key: a worker
reads the key file itself from the fleet directory, so key material never enters Ray's object
store (which may spill to disk) or a task's arguments.

Both engines run each job through :func:`guarded`, which turns a failure into a one-line
message, and retry a failed job up to ``retries`` times; a worker that dies (killed, out of
memory, a lost node) counts as a failed attempt.  Results arrive in completion order through
``on_done`` so the caller records each finished key at once: a driver killed mid-fleet loses
only the keys in flight.
"""

from __future__ import annotations

import errno
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyedge.deps import require
from keyedge.errors import KeyedgeError


@dataclass
class Job:
    """One key's step: ``fn(**kwargs)`` on some worker; ``name`` is the device it is for."""

    name: str
    fn: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any]


@dataclass
class Outcome:
    """What became of a job: its result, or the last attempt's one-line error."""

    name: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0


def error_line(exc: BaseException) -> str:
    """A failure as one line: keyedge's own message, an OS error's reason, else the exception's type and text."""
    if isinstance(exc, KeyedgeError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{(exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))).lower()}{where}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def guarded(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Run one job; never raise (except Ctrl-C): ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": line}``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        result = fn(**kwargs)
    except Exception as exc:  # one key's failure must not stop the fleet
        detail = traceback.format_exc() if os.environ.get("KEYEDGE_TRACEBACK") else None
        return {"ok": False, "error": error_line(exc), "traceback": detail, "seconds": time.perf_counter() - started}
    return {"ok": True, "result": result, "seconds": time.perf_counter() - started}


class LocalEngine:
    """Jobs one after another in this process (the default: no cluster needed)."""

    name = "local"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def describe(self) -> str:
        return "this machine, one job at a time"

    def run(self, jobs: Sequence[Job], *, retries: int, on_done: Callable[[Outcome], None]) -> list[Outcome]:
        outcomes = []
        for job in jobs:
            for attempt in range(1, retries + 2):
                raw = guarded(job.fn, job.kwargs, self.threads)
                if raw["ok"] or attempt > retries:
                    break
            outcome = _outcome(job.name, raw, attempt)
            on_done(outcome)
            outcomes.append(outcome)
        return outcomes

    def close(self) -> None:
        pass


class RayEngine:
    """Each job a Ray task with ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs; Ray schedules them on the cluster.

    ``address=None`` starts a local Ray instance (stopped again by :meth:`close`); ``"auto"`` or
    ``HOST:PORT`` joins a running cluster, whose nodes must have keyedge installed and see the
    fleet directory at the same path (a shared file system).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_job: float = 1,
        gpus_per_job: float = 0,
        num_cpus: int | None = None,
    ):
        ray = require("ray", extra="ray")
        self.ray = ray
        self.cpus_per_job, self.gpus_per_job = cpus_per_job, gpus_per_job
        self.started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "logging_level": "WARNING"}
            if address is None:
                options["num_cpus"] = num_cpus
            try:
                ray.init(address=address, **options)
            except ConnectionError as exc:
                raise KeyedgeError(
                    f"cannot reach the Ray cluster at {address}: {error_line(exc)}",
                    "start it (`ray start --head`), check --address, or use --engine local",
                ) from None
            self.started = True
        self._remote = ray.remote(guarded).options(
            num_cpus=cpus_per_job,
            num_gpus=gpus_per_job,
            max_retries=0,  # retries are ours, counted per key
        )

    def describe(self) -> str:
        resources = self.ray.cluster_resources()
        return (
            f"Ray ({int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs; "
            f"{self.cpus_per_job:g} CPU and {self.gpus_per_job:g} GPU per job)"
        )

    def run(self, jobs: Sequence[Job], *, retries: int, on_done: Callable[[Outcome], None]) -> list[Outcome]:
        ray = self.ray
        threads = max(1, int(self.cpus_per_job))
        pending: dict[Any, tuple[Job, int]] = {}

        def submit(job: Job, attempt: int) -> None:
            pending[self._remote.remote(job.fn, job.kwargs, threads)] = (job, attempt)

        for job in jobs:
            submit(job, 1)
        outcomes = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job, attempt = pending.pop(ready[0])
                try:
                    raw = ray.get(ready[0])
                except (ray.exceptions.RayError, OSError) as exc:  # the worker died, or its node was lost
                    raw = {"ok": False, "error": f"the worker was lost ({type(exc).__name__})", "seconds": 0.0}
                if not raw["ok"] and attempt <= retries:
                    submit(job, attempt + 1)
                    continue
                outcome = _outcome(job.name, raw, attempt)
                on_done(outcome)
                outcomes.append(outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)  # Ctrl-C: stop the jobs in flight, not only the driver
            raise
        return outcomes

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _outcome(name: str, raw: dict[str, Any], attempts: int) -> Outcome:
    return Outcome(
        name=name,
        ok=raw["ok"],
        result=raw.get("result") or {},
        error=raw.get("error"),
        attempts=attempts,
        seconds=raw.get("seconds", 0.0),
    )


def make_engine(
    name: str,
    *,
    address: str | None = None,
    cpus_per_job: float = 1,
    gpus_per_job: float = 0,
    threads: int | None = None,
    num_cpus: int | None = None,
) -> LocalEngine | RayEngine:
    """``local`` or ``ray``; anything else is a one-line error."""
    if name == "local":
        if address is not None:
            raise KeyedgeError("--address is for --engine ray", "drop --address, or pass --engine ray")
        return LocalEngine(threads)
    if name == "ray":
        if cpus_per_job <= 0 or gpus_per_job < 0:
            raise KeyedgeError("--cpus-per-job must be > 0 and --gpus-per-job >= 0")
        return RayEngine(address, cpus_per_job=cpus_per_job, gpus_per_job=gpus_per_job, num_cpus=num_cpus)
    raise KeyedgeError(f"unknown engine {name!r}", "use --engine local or --engine ray")


__all__ = ["Job", "LocalEngine", "Outcome", "RayEngine", "error_line", "guarded", "make_engine"]
