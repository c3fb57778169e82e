"""The export-backend interface and the registry of export targets.

One backend per target (``onnx``, ``openvino``, ``coreml``, ``litert``, ``executorch``) implements
:class:`ExportBackend` and registers itself with :func:`register_backend`, the
timm/timmx registry pattern (docs/design.md §8): ``get_backend("onnx").export(model,
Path("out/model.onnx"), ExportOptions(batch=None))``.  A backend module imports
its converter only when used, so listing the backends costs nothing and a missing
converter gives a :class:`~keyedge.errors.DependencyError` naming the extra.
:meth:`ExportBackend.load` returns a :class:`Runner`, the one way an artifact is run.

What the backends share lives beside this module, each in its own: capturing converters'
output and turning their failures into one line (:mod:`keyedge.exporters.capture`, used
here by :meth:`ExportBackend.export` and :meth:`ExportBackend.load`), checking traced
artifacts against the module (:mod:`keyedge.exporters.checks`), and reading an exported
graph back for :meth:`ExportBackend.inspect` (:mod:`keyedge.exporters.graph`).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import faulthandler
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from keyedge.deps import EXTRAS, require, version_of
from keyedge.errors import DependencyError, KeyedgeError, OutputError, ShapeError
from keyedge.exporters.capture import Quiet, environment_error, one_line
from keyedge.exporters.graph import GraphReport
from keyedge.keys.seal import SEALED_SUFFIX
from keyedge.registry import Registry

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "dynamic-int8", "int4")
#: where keyedge offers each precision that only some targets export (what a refusal names)
OFFERED = {
    "bf16": "where the runtime computes in bf16 on CPUs with BF16: -t openvino",
    "dynamic-int8": "int8 weights with activations quantized per call: -t litert or -t executorch",
    "int4": "4-bit weight palettization: -t coreml",
}


class ExportError(KeyedgeError):
    """A model cannot be exported, or an exported artifact cannot be read or run.

    ``details`` keeps what the converter printed while it failed (hidden from the one-line message).
    """

    def __init__(self, message: str, hint: str | None = None, *, details: str = ""):
        super().__init__(message, hint)
        self.details = details


@dataclass
class ExportOptions:
    """What to export: batch (``None`` = dynamic), precision, the square input size and the I/O names.

    Inputs are [0, 1] float32 NCHW images with 3 channels; outputs are float32 logits
    in every precision (``fp16`` puts weights and compute in half where the target can;
    ``int8`` is static post-training quantization, calibrated on ``calibration``: (N, 3, S, S)
    float32 images as the artifact receives them, i.e. before the in-graph shuffle; ``dynamic-int8``
    int8 weights with activations quantized per call, ``int4`` 4-bit palettized weights: neither calibrates).
    """

    batch: int | None = 1
    precision: str = "fp32"
    image_size: int = 224
    input_name: str = "image"
    output_name: str = "logits"
    calibration: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: int8, where a quantizer can (OpenVINO: NNCF's ``quantize_with_accuracy_control``): held-out images the
    #: quantized model must agree with the fp32 one on, to within ``max_agreement_loss`` of top-1 answers;
    #: layers go back to float, most sensitive first, until it does.  None: plain post-training quantization
    validation: np.ndarray | None = field(default=None, repr=False, compare=False)
    max_agreement_loss: float = 0.02

    def __post_init__(self) -> None:
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ExportError(f"batch must be a positive integer or None (dynamic), got {self.batch!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}", f"use {' or '.join(PRECISIONS)}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ExportError(f"image size must be a positive integer, got {self.image_size!r}")
        for what, name in (("input", self.input_name), ("output", self.output_name)):
            if not name or not name.replace("_", "").isalnum() or name[0].isdigit():
                raise ExportError(f"{what} name {name!r} is not a plain identifier", "use letters, digits and _")
        if self.input_name == self.output_name:
            raise ExportError(f"input and output are both named {self.input_name!r}", "give them different names")
        if self.precision == "int8":
            shape = None if self.calibration is None else tuple(np.shape(self.calibration))
            if shape is None or len(shape) != 4 or shape[0] < 1 or shape[1:] != (3, self.image_size, self.image_size):
                raise ExportError(
                    f"int8 needs calibration images of shape (N, 3, {self.image_size}, {self.image_size}), "
                    f"got {'none' if shape is None else shape}",
                    "pass calibration=images (keyedge export draws them from the checkpoint's training data)",
                )

    @property
    def dynamic(self) -> bool:
        return self.batch is None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The declared input shape, -1 for a dynamic batch."""
        return (self.batch or -1, 3, self.image_size, self.image_size)

    def example_input(self) -> torch.Tensor:
        """A fixed random [0, 1] example; batch 2 for a dynamic batch (so tracing cannot specialize on 1)."""
        generator = torch.Generator().manual_seed(0)
        return torch.rand(self.batch or 2, 3, self.image_size, self.image_size, generator=generator)

    def as_fp32(self) -> ExportOptions:
        """The same export in float32 (the graph an int8 artifact is quantized from)."""
        return replace(self, precision="fp32", calibration=None, validation=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("calibration")
        if d.pop("validation") is None:
            d.pop("max_agreement_loss")
        return d


# ---- the interface ------------------------------------------------------------------------


class ExportBackend(abc.ABC):
    """One export target: write an artifact from an eval-mode module, read it back, run it.

    Subclasses set ``name``, ``extra``, ``suffix`` and the import names ``export_modules`` /
    ``runtime_modules`` and ``runtime`` (the device-profile name of its runtime), and implement ``_export``,
    ``_load`` (returning a :class:`Runner`), ``inspect`` and ``describe_io``.
    """

    name: str = ""
    extra: str = ""
    suffix: str = ""
    export_modules: tuple[str, ...] = ()
    runtime_modules: tuple[str, ...] = ()
    runtime: str = ""  # the runtime's name in device profiles (onnxruntime, openvino, coreml)
    #: whether :meth:`template_for` / :meth:`export_from_template` write a key's artifact from its architecture's
    #: fleet template (keyedge.exporters.template)
    supports_template: bool = False
    #: the exact forms of the key's shuffle this target's converter writes (``--fuse fastest`` times them)
    forms: tuple[str, ...] = ("gather", "elements", "conv", "planes")
    #: the form ``--fuse auto`` gives this target where folding is not exact: its runtime's fastest, as measured
    #: by ``benchmarks/experiments/keyed_latency.py`` (the figures beside each backend's value)
    auto_form: str = "gather"
    #: the ``[[runtime]]`` fields a device profile may set for this runtime (besides name and threads), each
    #: ``(choices, default)``: a tuple of allowed strings (a list field holds several), ``bool``, or None (any string)
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {}
    #: the option that names the device in reports (its first value when it is a list)
    device_option: str | None = None
    #: whether keyedge seals this target's files (``export --seal``) and its runner loads them from memory
    sealable: bool = False
    #: whether the target's runtime has a random op, so a posture's in-graph noise can ship in its artifact; where
    #: it has none, ``random_refusal`` says why (``keyedge export --posture ...+noise:S`` refuses it in one line)
    random_ops: bool = False
    random_refusal: str = "its runtime has no random op"
    #: the precisions this target exports, and why the others are not (one line with its fix)
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")  # bf16: where a runtime computes in it (OpenVINO)
    precision_refusal: tuple[str, str] = ("", "")
    #: whether its int8 quantizer honours ``ExportOptions.validation`` (accuracy-aware quantization)
    accuracy_control: bool = False

    # ---- capability -----------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Whether this target can export here, and why (versions, or the missing dependency)."""
        return _importable(self.export_modules, self.extra)

    def can_run(
        self, *, device: str | None = None, providers: Sequence[str] | None = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        """Whether artifacts of this target can run on this host (on ``device``/``providers``...), and why.

        The one availability check per backend and device: export verification, ``bench latency``
        profiles and ``doctor`` all ask it.  Never raises.
        """
        return _importable(self.runtime_modules, self.extra)

    def devices(self) -> list[str]:
        """The devices (execution providers, compute units) this host's runtime offers; [] when it cannot run."""
        return []

    def require(self, module: str) -> Any:
        """Import a dependency of this target quietly, or raise DependencyError naming the extra."""
        with Quiet():
            return require(module, extra=self.extra)

    # ---- export ---------------------------------------------------------------------------
    def export(
        self, module: torch.nn.Module, path: Path, options: ExportOptions, *, placeholders: bool = False
    ) -> list[Path]:
        """Write the artifact for ``module`` at ``path``; return every file or directory written.

        ``module`` must be in eval mode and map (B, 3, S, S) float32 in [0, 1] to (B, classes)
        logits.  ``path`` must end in :attr:`suffix` and must not exist yet; its directory must.
        With ``placeholders`` the planned outputs exist already and are written through (the
        in-memory files of a sealed export, :class:`keyedge.fileio.MemoryFiles`).
        On failure whatever was written is removed and :class:`ExportError` is raised.
        """
        path = Path(path)
        self._check_export(module, path, options, placeholders=placeholders)
        ok, reason = self.available()
        if not ok:
            raise DependencyError(f"cannot export to {self.name}: {reason}", _install_hint(self.extra))
        planned = self.planned_outputs(path)
        quiet = Quiet()
        try:
            with quiet, torch.no_grad():
                written = self._export(module, path, options)
        except BaseException as exc:
            for item in planned:
                _remove(item)
            if isinstance(exc, ExportError) and not exc.details:
                exc.details = quiet.text
            if isinstance(exc, KeyedgeError) or not isinstance(exc, Exception):
                raise
            env = environment_error(exc)
            if env is not None:
                raise OutputError(
                    f"cannot write the {self.name} artifact in {path.parent}: {(env.strerror or str(env)).lower()}",
                    "free some space or choose a writable --out, then export again",
                ) from None
            raise ExportError(
                f"{self.name} export failed: {one_line(exc)}",
                "the converter could not handle this model; see ExportError.details",
                details=quiet.text,
            ) from exc
        return written

    def planned_outputs(self, path: Path) -> list[Path]:
        """Every path an export to ``path`` writes (the artifact and its companions)."""
        return [path]

    def template_for(self, cache: dict, ident: tuple, module: torch.nn.Module, options: ExportOptions) -> Any:
        """The fleet template of ``module``'s architecture ``ident`` (built into ``cache`` the first time), or None
        when ``module`` does not fit it: then the key is exported in full."""
        return None

    def export_from_template(
        self, template: Any, module: torch.nn.Module, path: Path, options: ExportOptions
    ) -> list[Path]:
        """Write ``module``'s artifact from the template :meth:`template_for` returned for it."""
        raise ExportError(f"the {self.name} target does not export from templates", "export in full")

    def check_precision(self, precision: str) -> None:
        """Raise a one-line :class:`ExportError` when this target does not export ``precision``."""
        if precision in OFFERED and precision not in self.precisions:
            raise ExportError(
                f"the {self.name} target does not export {precision}: keyedge offers it {OFFERED[precision]}",
                f"export {precision} with that target, or {' / '.join(self.precisions)} for {self.name}",
            )
        if precision not in self.precisions:
            why, fix = self.precision_refusal
            raise ExportError(f"the {self.name} target does not export {precision}: {why}", fix)

    def _check_export(
        self, module: torch.nn.Module, path: Path, options: ExportOptions, *, placeholders: bool = False
    ) -> None:
        if not isinstance(options, ExportOptions):
            raise ExportError(f"options must be ExportOptions, got {type(options).__name__}")
        self.check_precision(options.precision)
        if not isinstance(module, torch.nn.Module):
            raise ExportError(f"can only export a torch.nn.Module, got {type(module).__name__}")
        if any(sub.training for sub in module.modules()):
            raise ExportError("the model is in training mode (dropout, batch-norm updates)", "call .eval() first")
        if path.suffix != self.suffix:
            raise ExportError(
                f"a {self.name} artifact must end in {self.suffix}, got {path.name!r}",
                f"name it e.g. model{self.suffix}",
            )
        for item in [] if placeholders else self.planned_outputs(path):
            if item.exists() or item.is_symlink():
                raise OutputError(f"{item} already exists", "export into a new or empty directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"output directory {parent} does not exist", "create it first")

    @abc.abstractmethod
    def _export(self, module: torch.nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        """Convert and write; runs with converter output captured and under ``torch.no_grad``."""

    # ---- inference ------------------------------------------------------------------------
    def load(
        self,
        path: Path,
        *,
        device: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        compute_units: str | None = None,
        precision: str | None = None,
        spinning: bool | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> Runner:
        """Open the artifact at ``path`` for inference: the one place an artifact of this target is opened.

        ``device``: the runtime's device (OpenVINO ``CPU``/``GPU``...); ``threads``: intra-op threads
        (None: the runtime's default); ``providers``: ONNX Runtime execution providers;
        ``compute_units``: CoreML compute units; ``precision``: inference precision (None: the
        artifact's own); ``spinning``: ONNX Runtime's idle-thread spin-wait (None: its default).
        A backend ignores the settings that mean nothing to it.  ``files``: the artifact's files held in
        memory, by file name (a sealed artifact, decrypted by :mod:`keyedge.runtime`); ``path`` then
        only names it and need not exist.
        """
        path = Path(path)
        for module in self.runtime_modules:
            self.require(module)  # a missing runtime: DependencyError naming the extra
        ok, reason = self.can_run(device=device, providers=providers, compute_units=compute_units)
        if not ok:
            raise ExportError(f"cannot run {self.name} artifacts here: {reason}")
        if files is not None and not self.sealable:
            raise ExportError(f"{self.name} artifacts cannot be loaded from memory by keyedge")
        if files is None and not path.exists():
            raise ExportError(f"{path} does not exist", f"export a {self.name} artifact there first")
        settings = {
            "device": device,
            "threads": threads,
            "providers": list(providers) if providers else None,
            "compute_units": compute_units,
            "precision": precision,
            "spinning": spinning,
        }
        try:
            with Quiet():
                return self._load(path, **settings) if files is None else self._load(path, files=files, **settings)
        except KeyedgeError:
            raise
        except Exception as exc:
            raise ExportError(f"{self.name} cannot load {path.name}: {one_line(exc)}") from exc

    @abc.abstractmethod
    def _load(self, path: Path, **settings: Any) -> Runner:
        """Open the artifact (runtime present, file there, or ``files`` given); settings as :meth:`load`."""

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        """One-off inference: load the artifact, run ``x`` ((B, 3, S, S) float32 in [0, 1]), close it."""
        with self.load(path) as runner:
            return runner(x)

    # ---- reading back ---------------------------------------------------------------------
    def inspect(self, path: Path) -> GraphReport:
        """Structural check of the artifact, on every OS (nothing is run); a malformed file is one ExportError."""
        return self._reading(path, self._inspect)

    def describe_io(self, path: Path) -> dict[str, Any]:
        """``{"format", "inputs": [{"name", "shape", "dtype"}], "outputs": [...], "precision", ...}``.

        Shapes use -1 for dynamic dimensions; dtypes are numpy names (``"float32"``).
        """
        return self._reading(path, self._describe_io)

    def _reading(self, path: Path, read: Any) -> Any:
        """``read(path)``, with whatever a damaged file makes a reader raise (a ``UnicodeDecodeError`` in a
        flatbuffer string, an ``IndexError`` in a table) turned into one line naming the file."""
        try:
            return read(Path(path))
        except KeyedgeError:
            raise
        except (Exception, RecursionError) as exc:
            raise ExportError(
                f"cannot read {path} as a {self.name} artifact: {one_line(exc)}", "export it again"
            ) from None

    @abc.abstractmethod
    def _inspect(self, path: Path) -> GraphReport:
        """:meth:`inspect`'s work (exceptions are turned into one line there)."""

    @abc.abstractmethod
    def _describe_io(self, path: Path) -> dict[str, Any]:
        """:meth:`describe_io`'s work."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, suffix={self.suffix!r})"


# ---- runners --------------------------------------------------------------------------------


class Runner(abc.ABC):
    """A loaded artifact: call it with an NCHW float32 batch, get float32 logits.

    ``input_shape`` has None for dynamic dimensions.  :meth:`infer` is the runtime's bare call
    (no checks, no copy of the output: what latency benchmarks time); ``runner(x)`` checks the
    shape and returns the logits as a numpy array it owns; :meth:`predict` takes any number of
    images, in chunks of the artifact's batch (a fixed-batch artifact gets its last chunk padded).
    """

    backend: str = ""
    providers: list[str] | None = None  # ONNX Runtime: the providers the session actually uses

    def __init__(self, path: Path, input_shape: Sequence[int | None], settings: dict[str, Any]):
        self.path = Path(path)
        self.input_shape = list(input_shape)
        self.settings = {k: v for k, v in settings.items() if v is not None}

    @abc.abstractmethod
    def infer(self, x: np.ndarray) -> Any:
        """The runtime's own inference call on contiguous float32 input of the artifact's shape."""

    @abc.abstractmethod
    def logits(self, result: Any) -> np.ndarray:
        """The logits in what :meth:`infer` returned."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        check_input_shape(self.path, [d or -1 for d in self.input_shape], x)
        try:
            out = self.logits(self.infer(x))
        except KeyedgeError:
            raise
        except Exception as exc:
            raise ExportError(f"{self.backend} inference on {self.path.name} failed: {one_line(exc)}") from exc
        return np.array(out, dtype=np.float32, copy=True)

    @property
    def batch(self) -> int | None:
        """The artifact's fixed batch size, or None for a dynamic batch."""
        return self.input_shape[0] if self.input_shape else None

    def predict(self, x: np.ndarray, *, chunk: int = 64) -> np.ndarray:
        """Logits for any number of images: chunks of the fixed batch (last one padded), or of ``chunk``."""
        x = np.asarray(x, dtype=np.float32)
        outputs = [self(batch)[:n] for batch, n in batches(x, self.batch or chunk, pad=self.batch is not None)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def describe(self) -> dict[str, Any]:
        """What was loaded and how, for reports."""
        info = {"backend": self.backend, "path": str(self.path), "input_shape": self.input_shape, **self.settings}
        if self.providers is not None:
            info["providers"] = self.providers
        return info

    def close(self) -> None:
        """Release the runtime's session or compiled model."""
        return None  # a runtime without explicit release: garbage collection frees it

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name!r}, input_shape={self.input_shape})"


def batches(x: np.ndarray, size: int, *, pad: bool) -> Iterable[tuple[np.ndarray, int]]:
    """``(chunk, n_real)`` over ``x`` in chunks of ``size``; with ``pad`` the last chunk repeats its last image."""
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        n = len(chunk)
        if pad and n < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
        yield chunk, n


# ---- registry -----------------------------------------------------------------------------

#: Registry: target name -> backend class (filled by :func:`register_backend` when ``keyedge.exporters`` is imported)
BACKENDS: Registry[type[ExportBackend]] = Registry("export target", ExportBackend)
B = TypeVar("B", bound=type[ExportBackend])


def register_backend(cls: B) -> B:
    """Class decorator: make ``cls`` available as ``get_backend(cls.name)``."""
    return BACKENDS.register(cls)


def list_backends() -> list[str]:
    """Registered target names, in registration order."""
    return BACKENDS.names()


def is_backend(name: str) -> bool:
    """Whether ``name`` is a registered export target."""
    return name in BACKENDS


def get_backend(name: str) -> ExportBackend:
    """A fresh backend for target ``name``; :class:`KeyedgeError` for an unknown one."""
    return BACKENDS.get(name)()


def target_of(path: str | os.PathLike, *, sealed: bool = True) -> str | None:
    """The target whose artifact ``path`` is, from its suffix (``model.xml`` -> openvino); None if no target writes it.

    With ``sealed`` a sealed file (``export --seal``) counts as its plaintext (``model.xml.sealed`` -> openvino;
    :data:`keyedge.keys.seal.SEALED_SUFFIX`); ``sealed=False`` recognizes plain artifact names only.
    The one place an artifact's file name is mapped to its target.
    """
    name = Path(path).name
    if sealed:
        name = name.removesuffix(SEALED_SUFFIX)
    suffix = Path(name).suffix
    return next((target for target, cls in BACKENDS.items() if cls.suffix == suffix), None)


# ---- helpers ------------------------------------------------------------------------------


def check_input_shape(path: Path, expected: Sequence[int], x: np.ndarray) -> None:
    """Raise :class:`ShapeError` unless ``x`` fits ``expected`` (-1 = any size)."""
    if x.ndim != len(expected) or any(e not in (-1, g) for e, g in zip(expected, x.shape)):
        shown = "x".join("B" if e == -1 else str(e) for e in expected)
        raise ShapeError(
            f"{path.name} takes input of shape {shown}, got {'x'.join(map(str, x.shape))}",
            "resize the images, or export with the batch size you run",
        )


def _install_hint(extra: str) -> str:
    return EXTRAS[extra].install if extra in EXTRAS else "install the missing package"


def _importable(modules: Iterable[str], extra: str) -> tuple[bool, str]:
    found = []
    for module in modules:
        try:
            with Quiet():
                require(module, extra=extra)
        except DependencyError as exc:
            return False, exc.message
        except Exception as exc:
            return False, f"{module} fails to import ({one_line(exc)})"
        version = version_of(module.split(".")[0])
        found.append(f"{module} {version}" if version else module)
    return True, ", ".join(found)


def _remove(path: Path) -> None:
    """Remove what an export wrote at ``path``; a placeholder link (an in-memory file) is emptied, not removed."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink():
            with open(path, "wb"):  # so that a retry writes into memory again, never onto the disk
                pass
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# ---- native readers that may abort the process -------------------------------------------------------------------

_SURVIVED: set[tuple[str, int, int, int]] = set()
#: set in the probe child's environment (:func:`survives_in_child`)
PROBE_ENV = "KEYEDGE_PROBE_CHILD"
_PROBES: dict[str, subprocess.Popen] = {}  # target -> its probe child (started on first use)
_PROBE_LOCK = threading.Lock()


def survives_in_child(path: Path, what: str, target: str, *, timeout: float = 120.0) -> None:
    """Open and run ``path`` with ``target``'s runtime in a child process first: refuse a file that makes it abort.

    ExecuTorch's C++ runtime calls ``abort()`` on some malformed programs (a damaged header): in
    this process that is SIGABRT and no message at all.  In a child, it is an exit status the parent
    turns into one :class:`ExportError`.  The child is a fresh interpreter (``python -m
    keyedge.exporters.probe``), not a fork: a fork of a process whose runtimes already run thread pools
    (ONNX Runtime, OpenVINO, XNNPACK) can deadlock on a lock another thread held, and did -- every load
    then waited out the timeout.  One child per target serves every probe of this process (importing
    ExecuTorch takes ~10 s); one that died is started again.  A file that survived is remembered by
    (path, inode, size, mtime), so a second load costs nothing.  A child that hangs past ``timeout`` is
    killed and the file opened as before.
    """
    if os.environ.get(PROBE_ENV):  # this process is the probe: open the file for real
        return
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return  # the loader says what is wrong with the path
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _SURVIVED:
        return
    with _PROBE_LOCK:
        if _single_threaded():  # a fork is safe (no other thread holds a lock) and costs no interpreter start
            status = _probe_forked(target, str(path.resolve()), timeout)
        else:
            status = _probe(target, str(path.resolve()), timeout)
    if status is not None and status < 0:
        name = signal.Signals(-status).name
        raise ExportError(
            f"{path} is not a usable {what}: the runtime crashed reading it ({name}); the file is damaged or foreign",
            "export it again, or restore it from a copy",
        )
    if status == 0:
        _SURVIVED.add(key)


def _single_threaded() -> bool:
    """Whether this process runs one thread (``/proc/self/status``; native runtime threads count too)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return any(line.split() == ["Threads:", "1"] for line in status.splitlines())


def _probe_forked(target: str, path: str, timeout: float) -> int | None:
    """:func:`_probe`'s answer from a forked child (Linux, single-threaded processes only)."""
    from keyedge.exporters.probe import check

    pid = os.fork()
    if pid == 0:  # the child: no output, no clean-up handlers, just the exit status
        os.environ[PROBE_ENV] = "1"
        faulthandler.disable()  # its dump of the crash would reach the terminal through its own descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os._exit(check(target, path))
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def _probe(target: str, path: str, timeout: float) -> int | None:
    """Ask ``target``'s probe child to open ``path``: 0 (it ran), 3 (a Python error), -signal (the child died of
    it) or None (no answer in time: the child is killed)."""
    child = _PROBES.get(target)
    if child is None or child.poll() is not None:
        command = [sys.executable, "-m", "keyedge.exporters.probe", target]
        child = subprocess.Popen(
            command,
            env={**os.environ, PROBE_ENV: "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        _PROBES[target] = child
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(path + "\n")
        child.stdin.flush()
    except OSError:
        pass  # it died already: its status below
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    if not ready:
        child.kill()
        child.wait()
        _PROBES.pop(target, None)
        return None
    answer = child.stdout.readline().strip()
    if answer:
        return int(answer)
    _PROBES.pop(target, None)  # end of file: the runtime took the child down
    return child.wait()


@atexit.register
def _close_probes() -> None:
    for child in _PROBES.values():
        with contextlib.suppress(OSError):
            child.stdin.close()  # the child exits at the end of its input
            child.wait(5)
