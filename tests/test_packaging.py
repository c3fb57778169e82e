"""A non-editable install (the built wheel) gives a working `keyedge` with keyedge.exporters/benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout_and_console_script(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("keyedge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keyedge/exporters/__init__.py" in names and "keyedge/benchmarks/experiments/transform.py" in names
    # every package of the source tree is in the wheel (a package left out of pyproject's list would be missing)
    trees = {
        ROOT / "keyedge": "keyedge",
        ROOT / "exporters": "keyedge/exporters",
        ROOT / "benchmarks": "keyedge/benchmarks",
    }
    packages = [f"{dest}/{init.parent.relative_to(src).as_posix()}/__init__.py".replace("/./", "/")
                for src, dest in trees.items() for init in src.rglob("__init__.py")]  # fmt: skip
    missing = [p for p in packages if p not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject's packages): {missing}"
    assert not any(n.startswith(("exporters/", "benchmarks/", "tests/")) for n in names), "no generic top-level names"

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "keyedge"
    key = tmp_path / "k.bin"
    # run from an empty directory so nothing resolves to the source tree
    for args in (["key", "new", "-b", "2", "-o", str(key)], ["key", "show", str(key), "--json"]):
        proc = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keyedge, keyedge.exporters, keyedge.benchmarks.experiments.transform, keyedge.postures.guard, "
            "keyedge.benchmarks.robustness, keyedge.app.fleet, keyedge.checkpoints, keyedge.attacks;"
            "print(keyedge.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
