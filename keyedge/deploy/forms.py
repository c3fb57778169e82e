"""Which exact form of the key's shuffle each target gets under ``--fuse auto`` and ``--fuse fastest``.

The forms (:data:`keyedge.defenses.keyed.SHUFFLE_FORMS`: ``gather``, ``elements``, ``conv``) compute the
same permutation bit for bit; runtimes run them at different speeds (ONNX Runtime copies a Gather's single
elements one ``memcpy`` each, LiteRT and ExecuTorch run the strided conv fastest, the Neural Engine runs no
gather).  ``fold`` is taken first wherever it is exact: the graph is then the plain model's, so it costs nothing.
Elsewhere:

* ``auto`` gives each target its runtime's measured fastest form
  (:attr:`~keyedge.exporters.base.ExportBackend.auto_form`, from ``benchmarks/experiments/keyed_latency.py``);
* ``fastest`` exports every form the target writes, times them on this host in interleaved rounds
  (:func:`keyedge.timing.interleave`) through the target's own runtime, and keeps the fastest.
  Where the runtime does not run here (CoreML on Linux) it falls back to ``auto``'s form, and says so.

Either way the target's manifest record says what was chosen and why (``form_choice``): for ``fastest`` each
form's milliseconds per call and its ratio to the chosen one, the rounds, threads and this host's CPU.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from keyedge import host
from keyedge.defenses import Deployable
from keyedge.defenses.keyed import SHUFFLE_FORMS, shuffle_variant
from keyedge.errors import KeyedgeError
from keyedge.exporters import ExportOptions
from keyedge.exporters.base import ExportBackend
from keyedge.exporters.capture import one_line
from keyedge.fileio import MemoryFiles
from keyedge.stats import ratio_spread, spread
from keyedge.timing import RUNTIME_COOLDOWN_S, interleave

__all__ = ["FASTEST_ROUNDS", "choose_form"]

#: interleaved rounds and seconds per form per round of ``--fuse fastest``'s timing (about 2 s per form)
FASTEST_ROUNDS = 8
ROUND_SECONDS = 0.25


def choose_form(
    deploy: Deployable,
    backend: ExportBackend,
    requested: str,
    key: Any,
    options: ExportOptions,
    *,
    in_memory: bool,
    staging: Path,
    log: Callable[[str], None],
) -> tuple[Deployable, dict[str, Any] | None]:
    """The module this target exports and how its form was chosen (the manifest's ``form_choice``).

    Only a keyed model that did not fold, under ``auto`` or ``fastest``, is re-formed; an explicit form, a folded
    or a plain model is returned as it is -- except an explicit form the target cannot hold (a gather for ncnn,
    whose runtime has none): that target gets its ``auto`` form, which computes the same permutation, and the
    record says so.  ``in_memory``: the trial artifacts of ``fastest`` stay in memory (a sealed export); else they
    are written inside ``staging`` and removed.
    """
    forms = [f for f in SHUFFLE_FORMS if f in backend.forms]
    fallback = backend.auto_form if backend.auto_form in forms else forms[0]
    if requested in SHUFFLE_FORMS and deploy.fuse == requested and requested not in forms:
        why = f"{backend.name} does not run the {requested} form (it writes {', '.join(forms)})"
        log(f"  {backend.name}: {why}; taking {fallback}, the same permutation")
        record = {"rule": requested, "form": fallback, "measured": False, "reason": why}
        return shuffle_variant(deploy.module, key, fallback), record
    if requested not in ("auto", "fastest") or deploy.fuse != "gather":
        return deploy, ({"rule": requested, "form": deploy.fuse} if requested in ("auto", "fastest") else None)
    if requested == "auto":
        return shuffle_variant(deploy.module, key, fallback), {"rule": "auto", "form": fallback, "measured": False}
    can_run, why = backend.can_run()
    if not can_run:
        log(f"  {backend.name}: cannot time the forms here ({why}); taking {fallback} (auto)")
        record = {"rule": "fastest", "form": fallback, "measured": False, "reason": why}
        return shuffle_variant(deploy.module, key, fallback), record
    log(f"  {backend.name}: timing the shuffle's forms ({', '.join(forms)}) on this host")
    timed, failed = _time_forms(deploy.module, key, backend, forms, options, in_memory=in_memory, staging=staging)
    if not timed:
        raise KeyedgeError(
            f"{backend.name} exports none of the shuffle's forms ({'; '.join(f'{f}: {w}' for f, w in failed.items())})",
            "export this target with --fuse gather, or report this as a bug",
        )
    best = min(timed, key=lambda f: timed[f]["ms"])
    means = {form: t.pop("means") for form, t in timed.items()}
    for form, t in timed.items():  # per-round ratios: the rounds saw the same machine
        ratio = ratio_spread(means[form], means[best])
        t["ratio_to_chosen"] = {k: round(v, 4) for k, v in ratio.to_dict().items()}
    summary = ", ".join(f"{f} {t['ms']:.3f} ms" for f, t in timed.items())
    log(f"  {backend.name}: fastest form {best} ({summary})")
    record = {
        "rule": "fastest",
        "form": best,
        "measured": True,
        "timed": timed,
        "failed": failed,
        "rounds": FASTEST_ROUNDS,
        "threads": "runtime default",
        "batch": options.batch,
        "host": host.record(),
    }
    return shuffle_variant(deploy.module, key, best), record


def _time_forms(
    merged: nn.Module,
    key: Any,
    backend: ExportBackend,
    forms: list[str],
    options: ExportOptions,
    *,
    in_memory: bool,
    staging: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Export each form, open each through the target's runtime, time them interleaved: (form -> ms, failures)."""
    x = np.random.default_rng(0).random(tuple(options.input_shape), dtype=np.float32)
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        calls: dict[str, Callable[[], Any]] = {}
        for form in forms:
            name = f"{form}{backend.suffix}"
            if in_memory:  # a sealed export: the trial artifacts hold the key and never touch the disk
                memory = stack.enter_context(MemoryFiles([p.name for p in backend.planned_outputs(Path(name))]))
                path = memory.path(name)
            else:  # inside the 0700 staging directory, removed before the set is renamed into place
                path = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=staging))) / name
            module = shuffle_variant(merged, key, form).module
            try:
                backend.export(module, path, options, placeholders=in_memory)
                runner = stack.enter_context(backend.load(path))
                runner.predict(x)
            except KeyedgeError as exc:
                failed[form] = exc.message
                continue
            except Exception as exc:  # a converter's own error: this form is out, the others stay candidates
                failed[form] = one_line(exc)
                continue
            calls[form] = lambda runner=runner: runner.predict(x)
        if not calls:
            return {}, failed
        timing = interleave(
            calls, rounds=FASTEST_ROUNDS, warmup=3, round_seconds=ROUND_SECONDS, cooldown=RUNTIME_COOLDOWN_S
        )
    timed = {
        form: {"ms": round(spread(timing[form].means).median * 1e3, 4), "means": timing[form].means} for form in calls
    }
    return timed, failed
