"""The host's CPU as reports state it: the features that decide int8 and bf16 speed, and what doctor says of them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from keyedge import host
from keyedge.cli import app

# /proc/cpuinfo flags of the two hosts this project has run on (abridged)
XEON_AMX = set("fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split())
EPYC_AVX2 = set("fpu sse4_2 avx avx2 fma f16c".split())
ARM_PHONE = set("fp asimd asimdhp asimddp".split())  # a Cortex-A76: fp16 arithmetic and dot products


def test_features_name_what_decides_int8_and_bf16_speed():
    assert host.cpu_features(XEON_AMX) == {
        "avx2": True,
        "avx512": True,
        "vnni": True,
        "bf16": True,
        "amx": True,
        "fp16": False,
    }
    assert host.cpu_features(EPYC_AVX2) == dict.fromkeys(host.FEATURES, False) | {"avx2": True}  # f16c converts only
    arm = host.cpu_features(ARM_PHONE)
    assert arm["fp16"] and arm["vnni"] and not arm["bf16"] and not arm["avx2"]


def test_precision_notes_say_what_openvino_does_by_default():
    xeon = host.precision_notes(host.cpu_features(XEON_AMX))
    assert "bf16 by default" in xeon[0] and "VNNI/AMX" in xeon[1]
    epyc = host.precision_notes(host.cpu_features(EPYC_AVX2))
    assert "in f32 here" in epyc[0] and "no VNNI or AMX" in epyc[1]
    line = host.describe(host.cpu_features(EPYC_AVX2), "AMD EPYC")
    assert line == "AMD EPYC (AVX2; no VNNI, BF16, AMX, FP16)"


def test_doctor_states_this_hosts_cpu_and_features():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    cpu = json.loads(result.stdout)["cpu"]
    assert cpu["cpu"] == host.cpu_model() and cpu["features"] == host.cpu_features()
    assert len(cpu["precision_notes"]) == 2
    shown = CliRunner().invoke(app, ["doctor"])
    assert f"cpu: {host.describe()}" in shown.stdout
