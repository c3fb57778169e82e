"""``python -m keyedge.exporters.probe TARGET``: open and run artifacts in a child process of their own.

:func:`keyedge.exporters.base.survives_in_child` starts this once per target before a runtime that may
``abort()`` on a damaged file opens one in the user's process.  It reads one artifact path per line and
answers ``0`` when the file opens and runs, ``3`` on a Python error; a runtime that kills the process
ends its output instead, and the parent reads the signal from its exit status.  It prints nothing else.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def check(target: str, path: str) -> int:
    """0 when ``path`` opens and runs, 3 on a Python error.  One thread: the check is whether the file survives,
    and a forked probe (:func:`keyedge.exporters.base._probe_forked`) of a process whose OpenMP pool ran before
    (ncnn, pt2) waits forever in its first parallel region -- a libgomp pool does not survive a fork."""
    from keyedge.exporters import get_backend

    try:
        with get_backend(target).load(path, threads=1) as runner:
            runner.predict(np.zeros([d or 1 for d in runner.input_shape], dtype=np.float32))
    except Exception:
        return 3
    return 0


def main(argv: list[str]) -> int:
    (target,) = argv
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the parent's pipe: answers only
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the runtimes print goes nowhere
    for line in sys.stdin:
        answers.write(f"{check(target, line.rstrip(chr(10)))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
