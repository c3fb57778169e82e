"""Convert an ONNX model to a ``.rknn`` file and run it in RKNN's x86 simulator: keyedge's rknn converter process.

Run by the interpreter of the rknn-toolkit2 virtualenv (``make rknn-env``: ``.venv-rknn``, found through
``KEYEDGE_RKNN_PYTHON``), never by keyedge's own: rknn-toolkit2 2.5.0 pins numpy<=1.26.4, onnx<=1.18 and
protobuf<=4.25, which keyedge's environment cannot hold.  It imports the standard library, numpy and
``rknn.api`` only -- not keyedge.

The job is one JSON object, the first argument or standard input::

    {"onnx": "model.onnx", "output": "model.rknn", "target_platform": "rk3588",
     "precision": "fp16" | "int8", "dataset": ["calib-0.npy", ...],    # int8: (1, 3, S, S) float32 each
     "probes": ["probe-0.npy", ...], "probe_dir": "dir"}               # (1, 3, S, S) float32 each

``fp16`` is RKNN's float build (``do_quantization=False``: the NPU computes in float16); ``int8`` is its
``w8a8`` post-training quantization, calibrated on ``dataset`` (written to a dataset ``.txt``, one ``.npy``
per line, which rknn-toolkit2 reads as it reads images).  ``mean_values=0`` and ``std_values=1``: the
[0, 1] float image keyedge's model expects reaches the graph unchanged.  Each probe runs through the
simulator (``init_runtime()`` without a target, after ``build``: the simulator runs the built model, it
cannot load a ``.rknn`` file) with ``data_format="nchw"``; its output is written to ``probe_dir`` as
``out-<i>.npy``.

Everything the toolkit prints goes to ``<output>.log`` (file descriptors 1 and 2 are redirected while it
works); the one line on standard output is the result: ``{"ok": true, "toolkit": ..., "outputs": [...],
"seconds": {...}, "graph": ...}`` or ``{"ok": false, "stage": ..., "error": ...}`` with exit status 1.

rknn-toolkit2 imports torch at import time (two of its modules subclass ``torch.nn.Module`` and decorate
with ``torch.no_grad``) but never runs it on the ONNX path; where torch is not installed (keyedge's
``.venv-rknn`` leaves it out: from PyPI it brings gigabytes of CUDA wheels), :func:`_stand_in_torch` puts a
stand-in in ``sys.modules`` that serves those two names and refuses every other use in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
import types

# run as a script, this file's directory (keyedge's exporters, which hold an ``onnx.py``) would come first on
# sys.path and shadow the onnx package; keyedge runs it with ``python -I`` (which leaves it out) as well
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

STAND_IN = "torch is not installed in this environment (keyedge's rknn worker stands in for its import only)"


def _stand_in_torch() -> bool:
    """Make ``import torch`` succeed without torch: True when the stand-in was installed."""
    try:
        import torch
    except ImportError:
        pass
    else:
        del torch
        return False

    class _NoGrad:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, fn):  # used as ``@torch.no_grad()``
            return fn

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class _Module:  # a base class only: instantiating it means torch code is about to run
        def __init__(self, *args, **kwargs):
            raise RuntimeError(STAND_IN)

    class _Torch(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(f"{STAND_IN}; {self.__name__}.{name} was asked for")

    torch = _Torch("torch")
    torch.__version__ = "0+keyedge-stand-in"
    torch.__path__ = []
    torch.no_grad = _NoGrad
    nn = _Torch("torch.nn")
    nn.Module = _Module
    torch.nn = nn
    sys.modules["torch"] = torch
    sys.modules["torch.nn"] = nn
    return True


@contextlib.contextmanager
def _captured(log_path: str):
    """Send file descriptors 1 and 2 (the toolkit's Python prints and its C++ logs) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [(fd, os.dup(fd)) for fd in (1, 2)]
    with open(log_path, "wb") as sink:
        for fd, _ in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


class _Failed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def _check(stage: str, status: int) -> None:
    if status != 0:
        raise _Failed(stage, f"rknn-toolkit2's {stage} returned {status}")


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _config(platform: str, job: dict) -> dict:
    """rknn.config's arguments: the [0, 1] float image passed unchanged (mean 0, std 1), keyedge's note kept."""
    config = {"mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]], "target_platform": platform}
    if job.get("custom_string"):
        config["custom_string"] = job["custom_string"]
    return config


def _shuffled(job: dict, platform: str, probe_dir: str) -> list[str]:
    """Build the graph up to the key's shuffle (``shuffle_output``, an ONNX tensor) in float16 and run
    ``shuffle_probes`` through it in the simulator: ``shuffled-<i>.npy`` each."""
    import numpy as np
    from rknn.api import RKNN

    rknn = RKNN(verbose=False)
    try:
        _check("config", rknn.config(**_config(platform, {})))
        _check("load_onnx", rknn.load_onnx(model=job["onnx"], outputs=[job["shuffle_output"]]))
        _check("build", rknn.build(do_quantization=False))
        _check("init_runtime", rknn.init_runtime())
        written = []
        for i, probe in enumerate(job.get("shuffle_probes") or []):
            result = rknn.inference(inputs=[np.load(probe).astype(np.float32)], data_format=["nchw"])
            out = os.path.join(probe_dir, f"shuffled-{i}.npy")
            np.save(out, np.asarray(result[0], dtype=np.float32))
            written.append(out)
        return written
    finally:
        rknn.release()


def convert(job: dict) -> dict:
    """Do the job (see the module docstring); the result's JSON-able dict.  Raises on failure."""
    import numpy as np

    precision = job.get("precision", "fp16")
    if precision not in ("fp16", "int8"):
        raise _Failed("job", f"precision must be fp16 or int8, got {precision!r}")
    platform = job.get("target_platform") or "rk3588"
    onnx_path, output = job["onnx"], job["output"]
    probes, probe_dir = list(job.get("probes") or []), job.get("probe_dir")
    seconds: dict[str, float] = {}
    stand_in = _stand_in_torch()
    start = time.perf_counter()
    from rknn.api import RKNN

    seconds["import"] = round(time.perf_counter() - start, 3)
    rknn = RKNN(verbose=False)
    try:
        _check("config", rknn.config(**_config(platform, job)))
        start = time.perf_counter()
        _check("load_onnx", rknn.load_onnx(model=onnx_path))
        with tempfile.TemporaryDirectory(prefix="keyedge-rknn-") as tmp:
            dataset = None
            if precision == "int8":
                images = list(job.get("dataset") or [])
                if not images:
                    raise _Failed("job", "int8 needs calibration images (dataset: .npy paths)")
                dataset = os.path.join(tmp, "dataset.txt")
                with open(dataset, "w") as f:
                    f.write("".join(f"{p}\n" for p in images))
            _check("build", rknn.build(do_quantization=precision == "int8", dataset=dataset))
        seconds["build"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        _check("export_rknn", rknn.export_rknn(output))
        seconds["export"] = round(time.perf_counter() - start, 3)
        outputs = []
        if probes:
            start = time.perf_counter()
            _check("init_runtime", rknn.init_runtime())  # no target: the x86 simulator, on the built model
            for i, probe in enumerate(probes):
                x = np.load(probe).astype(np.float32)
                result = rknn.inference(inputs=[x], data_format=["nchw"])
                if not result:
                    raise _Failed("inference", f"the simulator returned no output for probe {i}")
                out = os.path.join(probe_dir, f"out-{i}.npy")
                np.save(out, np.asarray(result[0], dtype=np.float32))
                outputs.append(out)
            seconds["simulate"] = round(time.perf_counter() - start, 3)
    finally:
        rknn.release()
    shuffled = _shuffled(job, platform, probe_dir) if job.get("shuffle_output") else []
    return {
        "ok": True,
        "toolkit": _version("rknn-toolkit2"),
        "numpy": np.__version__,
        "torch": "stand-in" if stand_in else _version("torch"),
        "target_platform": platform,
        "precision": precision,
        "output": output,
        "outputs": outputs,
        "shuffled": shuffled,
        "seconds": seconds,
    }


def check() -> dict:
    """Whether the toolkit imports here (``{"check": true}``: what ``make rknn-env`` and keyedge's availability ask)."""
    with tempfile.NamedTemporaryFile(prefix="keyedge-rknn-check-", suffix=".log") as log:
        with _captured(log.name):
            stand_in = _stand_in_torch()
            import numpy as np
            from rknn.api import RKNN  # noqa: F401
    return {
        "ok": True,
        "toolkit": _version("rknn-toolkit2"),
        "numpy": np.__version__,
        "torch": "stand-in" if stand_in else _version("torch"),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = sys.stdout
    try:
        job = json.loads(argv[0] if argv else sys.stdin.read())
        if isinstance(job, dict) and job.get("check"):
            result = check()
        elif not isinstance(job, dict) or "onnx" not in job or "output" not in job:
            raise _Failed("job", "the job must be a JSON object with at least 'onnx' and 'output'")
        else:
            log = job.get("log") or f"{job['output']}.log"
            with _captured(log):
                result = convert(job)
            result["log"] = log
    except _Failed as exc:
        result = {"ok": False, "stage": exc.stage, "error": str(exc)}
    except Exception as exc:  # the toolkit's own exceptions, a bad job: one line, the trace in "details"
        # the toolkit's errors carry their own traceback in the message: its last line is what went wrong
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
        message = lines[-1] if lines else type(exc).__name__
        if not message.startswith(type(exc).__name__):
            message = f"{type(exc).__name__}: {message}"
        tb = traceback.format_exc().strip().splitlines()
        result = {"ok": False, "stage": "toolkit", "error": message, "details": tb[-12:]}
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
