"""Device profiles: which runtimes to time on a device, how long, and the regression thresholds.

A profile is a small TOML file (``devices/*.toml``) read with :mod:`tomllib` into a
:class:`DeviceProfile`, validated field by field: an unknown field, an unknown
runtime or a bad value is a one-line :class:`~keyedge.errors.KeyedgeError`
naming the file and the field.  The measurement settings follow optimum-benchmark
(warm-up, then at least ``min_iterations`` *and* ``min_seconds``); the
``[[runtime]]`` entries follow benchmark_app / onnxruntime_perf_test (a device or
execution providers per runtime).

    name = "cpu-x86"
    threads = 2
    batch_sizes = [1, 8]
    [[runtime]]
    name = "onnxruntime"
    providers = ["CPUExecutionProvider"]
    [thresholds]
    p50 = 1.10

A runtime that this host cannot run (package missing, provider or device absent,
CoreML off macOS) is *skipped with a reason* by :func:`runtime_available`, never an
exception.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from keyedge.deploy.export import torch_available
from keyedge.errors import KeyedgeError
from keyedge.exporters import get_backend, list_backends


def runtime_targets() -> dict[str, str]:
    """Runtime name -> the target it runs: each export backend's runtime, plus ``torch`` (checkpoints)."""
    return {get_backend(name).runtime: name for name in list_backends()} | {"torch": "torch"}


#: the torch runtime (a checkpoint timed eagerly) is no export backend: its profile options live here
TORCH_OPTIONS: dict[str, tuple[Any, Any]] = {"device": (("cpu", "cuda", "mps"), "cpu")}


def runtime_options(runtime: str) -> tuple[dict[str, tuple[Any, Any]], str | None]:
    """The profile options of ``runtime`` (``(choices, default)`` each) and the one naming its device."""
    if runtime == "torch":
        return TORCH_OPTIONS, "device"
    backend = get_backend(runtime_targets()[runtime])
    return backend.profile_options, backend.device_option


_TOP_FIELDS = {
    "name",
    "description",
    "threads",
    "batch_sizes",
    "warmup",
    "min_iterations",
    "min_seconds",
    "rounds",
    "runtime",
    "thresholds",
}
_THRESHOLD_FIELDS = {"ratio", "p50", "accuracy_drop"}


@dataclass
class Thresholds:
    """Regression-gate limits: current/baseline p50, keyed/plain ratio, absolute accuracy drop."""

    ratio: float = 1.05  # a keyed/plain (or gather/fold) median ratio above this fails
    p50: float = 1.10  # current p50 / baseline p50 above this fails
    accuracy_drop: float = 0.005  # baseline accuracy - current accuracy above this fails

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class RuntimeSpec:
    """One runtime on one device: ``onnxruntime`` + providers, ``openvino`` + device, ``coreml`` + compute units."""

    name: str
    device: str | None = None  # openvino: CPU/GPU/NPU/AUTO; torch: cpu/cuda/mps
    providers: list[str] | None = None  # onnxruntime
    compute_units: str | None = None  # coreml
    threads: int | None = None  # overrides the profile's threads
    spinning: bool | None = None  # onnxruntime: idle intra-op threads spin-wait (its default, and fastest)
    precision: str | None = None  # openvino: artifact (pinned, as parity needs) or host (the plugin's default here)

    @property
    def target(self) -> str | None:
        return runtime_targets()[self.name]

    @property
    def device_label(self) -> str:
        """The device as reported: ORT's first provider, OpenVINO's device, CoreML's compute units."""
        _, option = runtime_options(self.name)
        value = self.run_settings().get(option) if option else None
        return str(value[0] if isinstance(value, list) else value)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def run_settings(self) -> dict[str, Any]:
        """Keyword arguments of ``ExportBackend.load`` for this runtime (threads aside), defaults filled in."""
        options, _ = runtime_options(self.name)
        settings = {}
        for option, (_, default) in options.items():
            value = getattr(self, option)
            settings[option] = list(value) if isinstance(value, list) else (default if value is None else value)
        return settings


@dataclass
class DeviceProfile:
    """A device's benchmark settings, runtimes and regression thresholds."""

    name: str
    description: str = ""
    runtimes: list[RuntimeSpec] = field(default_factory=list)
    threads: int | None = None  # None: the runtime's default
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 5
    min_iterations: int = 50
    min_seconds: float = 2.0
    rounds: int = 10  # interleaved rounds aimed for (more are run until both minimums are met)
    thresholds: Thresholds = field(default_factory=Thresholds)
    source: str = "<built-in>"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runtimes"] = [r.to_dict() for r in self.runtimes]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Rebuild from :meth:`to_dict` output (e.g. the profile recorded in a report)."""
        data = dict(data)
        data["runtimes"] = [RuntimeSpec(**r) for r in data.get("runtimes", [])]
        data["thresholds"] = Thresholds(**data.get("thresholds", {}))
        return cls(**data)


def _fail(source: str, where: str, problem: str) -> KeyedgeError:
    return KeyedgeError(f"{source}: field '{where}' {problem}", "see devices/cpu-x86.toml for a valid profile")


def _check_int(source: str, where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(source: str, where: str, value: Any, minimum: float, *, strict: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
        or (strict and value == minimum)
    ):
        raise _fail(source, where, f"must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _check_str(
    source: str, where: str, value: Any, choices: tuple[str, ...] | None = None, *, indexed: bool = False
) -> str:
    """A string from ``choices``; with ``indexed`` a device index may follow (``GPU.0``, ``cuda:1``)."""
    base = value.replace(":", ".").split(".")[0] if indexed and isinstance(value, str) else value
    if not isinstance(value, str) or (choices is not None and base not in choices):
        allowed = f"one of {', '.join(choices)}" if choices else "a string"
        raise _fail(source, where, f"must be {allowed}, got {value!r}")
    return value


def _unknown(source: str, prefix: str, data: dict, allowed: set[str]) -> None:
    for name in data:
        if name not in allowed:
            raise _fail(source, f"{prefix}{name}", f"is unknown (allowed: {', '.join(sorted(allowed))})")


def _parse_runtime(source: str, index: int, data: Any) -> RuntimeSpec:
    where = f"runtime[{index}]"
    if not isinstance(data, dict):
        raise _fail(source, where, "must be a table ([[runtime]])")
    name = _check_str(source, f"{where}.name", data.get("name"), tuple(runtime_targets()))
    options, _ = runtime_options(name)
    _unknown(source, f"{where}.", data, {"name", "threads", *options})
    spec = RuntimeSpec(name=name)
    if "threads" in data:
        spec.threads = _check_int(source, f"{where}.threads", data["threads"], 1)
    for option, (choices, default) in options.items():
        value = data.get(option, default)
        field_name = f"{where}.{option}"
        if value is None:
            continue
        if choices is bool:
            if not isinstance(value, bool):
                raise _fail(source, field_name, f"must be true or false, got {value!r}")
        elif isinstance(choices, list):  # a list of strings from choices[0]
            if not isinstance(value, list) or not value:
                raise _fail(source, field_name, f"must be a non-empty list, got {value!r}")
            value = [_check_str(source, field_name, v, choices[0]) for v in value]
        else:
            value = _check_str(source, field_name, value, choices, indexed=option == "device")
        setattr(spec, option, value)
    return spec


def parse_profile(data: dict[str, Any], source: str = "<profile>") -> DeviceProfile:
    """Validate a parsed TOML document into a :class:`DeviceProfile` (errors name ``source`` and the field)."""
    _unknown(source, "", data, _TOP_FIELDS)
    name = _check_str(source, "name", data.get("name", Path(source).stem))
    profile = DeviceProfile(name=name, source=source)
    if "description" in data:
        profile.description = _check_str(source, "description", data["description"])
    if "threads" in data:
        profile.threads = _check_int(source, "threads", data["threads"], 1)
    if "batch_sizes" in data:
        sizes = data["batch_sizes"]
        if not isinstance(sizes, list) or not sizes:
            raise _fail(source, "batch_sizes", f"must be a non-empty list of integers, got {sizes!r}")
        profile.batch_sizes = [_check_int(source, "batch_sizes", b, 1) for b in sizes]
    if "warmup" in data:
        profile.warmup = _check_int(source, "warmup", data["warmup"], 0)
    if "min_iterations" in data:
        profile.min_iterations = _check_int(source, "min_iterations", data["min_iterations"], 1)
    if "min_seconds" in data:
        profile.min_seconds = _check_float(source, "min_seconds", data["min_seconds"], 0.0)
    if "rounds" in data:
        profile.rounds = _check_int(source, "rounds", data["rounds"], 1)
    runtimes = data.get("runtime", [])
    if not isinstance(runtimes, list) or not runtimes:
        raise _fail(source, "runtime", "must list at least one [[runtime]] table")
    profile.runtimes = [_parse_runtime(source, i, r) for i, r in enumerate(runtimes)]
    thresholds = data.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise _fail(source, "thresholds", "must be a table ([thresholds])")
    _unknown(source, "thresholds.", thresholds, _THRESHOLD_FIELDS)
    t = Thresholds()
    if "ratio" in thresholds:
        t.ratio = _check_float(source, "thresholds.ratio", thresholds["ratio"], 0.0, strict=True)
    if "p50" in thresholds:
        t.p50 = _check_float(source, "thresholds.p50", thresholds["p50"], 0.0, strict=True)
    if "accuracy_drop" in thresholds:
        t.accuracy_drop = _check_float(source, "thresholds.accuracy_drop", thresholds["accuracy_drop"], 0.0)
    profile.thresholds = t
    return profile


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate a device profile TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KeyedgeError(f"{path}: no such device profile", "see devices/*.toml for the shipped ones") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyedgeError(f"{path}: cannot read the device profile ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeyedgeError(f"{path}: not valid TOML ({exc})") from None
    return parse_profile(data, str(path))


#: Where the shipped profiles live in a source checkout (absent from a wheel: then :func:`builtin_profile`).
DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"


def builtin_profile() -> DeviceProfile:
    """This host's CPU through ONNX Runtime and OpenVINO: ``devices/cpu-x86.toml`` if present, else the same inline."""
    shipped = DEVICES_DIR / "cpu-x86.toml"
    if shipped.is_file():
        return load_profile(shipped)
    return DeviceProfile(
        name="cpu",
        description="built-in CPU profile",
        batch_sizes=[1, 8],
        runtimes=[
            RuntimeSpec("onnxruntime", providers=["CPUExecutionProvider"]),
            RuntimeSpec("openvino", device="CPU"),
            RuntimeSpec("litert", device="CPU"),
            RuntimeSpec("executorch", device="CPU"),
            RuntimeSpec("mnn", device="CPU"),
            RuntimeSpec("ncnn", device="CPU"),
            RuntimeSpec("aoti", device="CPU"),
        ],
    )


def runtime_available(spec: RuntimeSpec) -> tuple[bool, str]:
    """Can this host run ``spec``?  ``(True, reason)`` or ``(False, reason)``; never raises.

    Asks the backend of the runtime (``ExportBackend.can_run``), or PyTorch for ``torch``.
    """
    try:
        if spec.name == "torch":
            return torch_available(spec.device)
        settings = spec.run_settings()
        return get_backend(spec.target).can_run(
            device=settings.get("device"),
            providers=settings.get("providers"),
            compute_units=settings.get("compute_units"),
        )
    except Exception as exc:  # a broken install is a skip with its reason, never a crash
        return False, f"{spec.name} failed to initialise: {type(exc).__name__}: {exc}".splitlines()[0]


def with_host_precision(profile: DeviceProfile) -> DeviceProfile:
    """``profile`` with a twin of each OpenVINO runtime at the plugin's own default precision on this host.

    keyedge pins an artifact's inference precision for parity (f32 for fp32); on AMX / AVX-512 BF16 CPUs the
    plugin would otherwise run it in bf16, which is what a deployment that sets nothing gets.
    """
    twins = [
        dataclasses.replace(spec, precision="host")
        for spec in profile.runtimes
        if spec.name == "openvino" and spec.precision in (None, "artifact")
    ]
    return dataclasses.replace(profile, runtimes=[*profile.runtimes, *twins])
