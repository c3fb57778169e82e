"""What this host's CPU is and which of its features decide a runtime's speed and precision.

A latency figure means little without its host: int8 runs fast only with VNNI (AVX-512 VNNI, AVX-VNNI or ARM's
dot-product instructions), and OpenVINO's CPU plugin runs an fp32 model in bf16 by default where the CPU has AMX
or AVX-512 BF16 (fp16 on ARM CPUs with half-precision arithmetic).  :func:`cpu_features` names those features;
``keyedge doctor``, every benchmark report and ``--fuse fastest``'s manifest record them.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

#: feature -> the /proc/cpuinfo flags (x86 ``flags``, ARM ``Features``) any of which provides it
FEATURES = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni", "asimddp"),
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "amx": ("amx_bf16", "amx_int8", "amx_tile"),
    "fp16": ("avx512_fp16", "asimdhp", "fphp"),
}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``, ``sysctl`` on macOS), else what Python knows."""
    for line in _cpuinfo():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (lower case); on Apple silicon the ``hw.optional`` features that are set."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].lower().split())
    if sys.platform == "darwin" and platform.machine() == "arm64":  # every Apple M-series core has these
        flags = {"asimd", "asimdhp", "asimddp"}
        if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
        return flags
    return set()


def cpu_features(flags: set[str] | None = None) -> dict[str, bool]:
    """Which of :data:`FEATURES` this CPU has (``flags``: the flags to read, default this host's)."""
    flags = cpu_flags() if flags is None else flags
    return {name: any(f in flags for f in spellings) for name, spellings in FEATURES.items()}


def computes_bf16(features: dict[str, bool] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): where OpenVINO's bf16 is bf16."""
    features = cpu_features() if features is None else features
    return features["bf16"] or features["amx"]


def describe(features: dict[str, bool] | None = None, model: str | None = None) -> str:
    """One line: the CPU model and its relevant features, e.g. ``AMD EPYC (AVX2; no VNNI, BF16, AMX, FP16)``."""
    features = cpu_features() if features is None else features
    model = cpu_model() if model is None else model
    have = [n.upper() for n, ok in features.items() if ok]
    lack = [n.upper() for n in ("vnni", "bf16", "amx", "fp16") if not features[n]]
    parts = [", ".join(have) or "none of AVX2, AVX512, VNNI, BF16, AMX, FP16"]
    if lack and have:
        parts.append("no " + ", ".join(lack))
    return f"{model} ({'; '.join(parts)})"


def record() -> dict:
    """The host's CPU as a report records it: model, machine, relevant features."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "features": cpu_features()}


def precision_notes(features: dict[str, bool] | None = None) -> list[str]:
    """What this host's features mean for the precision a runtime runs, one line each (doctor prints them)."""
    f = cpu_features() if features is None else features
    notes = []
    if computes_bf16(f):
        notes.append(
            "OpenVINO runs an fp32 model in bf16 by default here (AMX/AVX-512 BF16): faster, ~0.1 off in logits; "
            "keyedge pins f32 for parity, `bench latency --host-precision` times both, and "
            "`export --precision bf16` makes a bf16 set verified by agreement"
        )
    elif f["fp16"]:
        notes.append("OpenVINO may run an fp32 model in fp16 by default here (half-precision arithmetic)")
    else:
        notes.append(
            "OpenVINO runs an fp32 model in f32 here (no BF16 or FP16 arithmetic): an `export --precision bf16` "
            "set is verified in f32 here"
        )
    if f["vnni"] or f["amx"]:
        notes.append("int8 runs on VNNI/AMX here: int8 artifacts are markedly faster than fp32")
    else:
        notes.append("no VNNI or AMX here: int8 runs on slower instructions, its gain over fp32 is smaller")
    return notes
