"""``keyedge doctor``: what is installed, which export targets and runtimes work on this host.

The report is data first (:func:`collect` returns a dict, serializable as JSON);
the CLI renders it as tables.  Every probe is guarded: a broken optional package
is reported with its error, it never crashes the doctor.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from keyedge import __version__, host
from keyedge.deps import CONFLICTS, CORE, EXTRAS, Conflict, version_of

# keyedge.exporters (and torch with it) is imported inside the probes: doctor must report a broken torch or
# converter install as a failed check, not die on importing it


def _probe(fn: Callable[[], Any]) -> tuple[bool, str]:
    try:
        return True, str(fn())
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def _export_check(target: str) -> Callable[[], str]:
    def probe() -> str:
        from keyedge.exporters import get_backend

        ok, reason = get_backend(target).available()
        if not ok:
            raise RuntimeError(reason)
        return reason

    return probe


def _runtime_check(target: str) -> Callable[[], str]:
    def probe() -> str:
        from keyedge.exporters import get_backend

        backend = get_backend(target)
        ok, reason = backend.can_run()
        if not ok:
            raise RuntimeError(reason)
        return ", ".join(backend.devices()) or reason

    return probe


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch")
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def _mps() -> str:
    import torch

    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("no Apple GPU (MPS) available")
    return "available"


def _torch_export() -> str:
    import torch

    return f"torch {torch.__version__}"


def _compatible(conflict: Conflict) -> Callable[[], str]:
    def probe() -> str:
        problem = conflict.found()
        if problem:
            raise RuntimeError(f"{problem}; fix: {conflict.fix}")
        mine, theirs = version_of(conflict.distribution), version_of(conflict.other)
        if mine is None:
            return f"{conflict.distribution} not installed"
        return f"{conflict.other} {theirs} with {conflict.distribution} {mine}: fine"

    return probe


def checks() -> list[tuple[str, str, Callable[[], Any], str | None]]:
    """(section, name, probe, extra that provides it): every export backend's own checks, then PyTorch's devices.

    ``ExportBackend.available`` / ``can_run`` are the one availability check per backend: doctor asks them.
    """
    from keyedge.exporters import get_backend, list_backends

    out: list[tuple[str, str, Callable[[], Any], str | None]] = []
    for name in list_backends():
        out.append(("export", name, _export_check(name), get_backend(name).extra))
    for name in list_backends():
        backend = get_backend(name)
        out.append(("runtime", backend.runtime, _runtime_check(name), backend.extra))
    out += [
        ("runtime", "torch-cpu", _torch_export, None),
        ("runtime", "torch-cuda", _cuda, None),
        ("runtime", "torch-mps", _mps, None),
    ]
    out += [("compatibility", f"{c.distribution}/{c.other}", _compatible(c), None) for c in CONFLICTS]
    return out


def collect() -> dict[str, Any]:
    """Probe this host; return the doctor report as plain data."""
    report: dict[str, Any] = {
        "keyedge": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": host.record() | {"precision_notes": host.precision_notes()},
        "core": {name: version_of(name) for name in CORE},
        "extras": {},
        "checks": [],
    }
    for extra in EXTRAS.values():
        versions = {dist: version_of(dist) for dist in extra.distributions}
        present = all(versions.values())
        if extra.command:  # installed outside keyedge's environment (rknn's converter): its backend knows
            from keyedge.exporters import get_backend, list_backends

            present = any(get_backend(t).available()[0] for t in list_backends() if get_backend(t).extra == extra.name)
        report["extras"][extra.name] = {
            "installed": present,
            "packages": versions,
            "purpose": extra.purpose,
            "install": extra.install,
        }
    for section, name, probe, extra in checks():
        ok, detail = _probe(probe)
        report["checks"].append(
            {
                "section": section,
                "name": name,
                "ok": ok,
                "detail": detail,
                "fix": EXTRAS[extra].install
                if (extra and not ok and not report["extras"][extra]["installed"])
                else None,
            }
        )
    return report
