"""``python -m keyedge.exporters.probe TARGET PATH``: open and run one artifact, in a child process of its own.

:func:`keyedge.exporters.base.survives_in_child` runs this before a runtime that may ``abort()`` on a damaged
file opens it in the user's process: exit status 0 when the file opens and runs, 3 on a Python error, and
the signal's (negative) status when the runtime kills the process.  It prints nothing.
"""

from __future__ import annotations

import sys

import numpy as np


def main(argv: list[str]) -> int:
    target, path = argv
    from keyedge.exporters import get_backend

    try:
        with get_backend(target).load(path) as runner:
            shape = [d or 1 for d in runner.input_shape]
            runner.predict(np.zeros(shape, dtype=np.float32))
    except BaseException:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
