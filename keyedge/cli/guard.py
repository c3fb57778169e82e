"""``keyedge guard``: a device's query guard state -- what it saw, and an operator's unlock.

``keyedge guard show STATE --set DIR`` prints the guard's counters (queries, flagged, refused, history) and
whether it is locked; ``keyedge guard unlock STATE --set DIR`` answers queries again after a ``lock`` guard
stopped them (the history is kept).  Stop the device's process first: a running device keeps its own copy of
the state and writes it back.  The state file belongs to one artifact set: another set's, or a corrupt
file, is refused in one line (docs/postures.md).
"""

from __future__ import annotations

from pathlib import Path

import typer

from keyedge.cli._console import console

guard_app = typer.Typer(
    help="A device's query guard state (a posture's guard, keyedge.runtime): show it, or unlock a locked device.",
    no_args_is_help=True,
)
STATE = typer.Argument(..., help="The guard state file the device keeps (open_artifact(..., guard_state=PATH)).")
SET = typer.Option(..., "--set", help="The artifact set (export directory) the device runs.")


def _open(state: Path, artifact_set: Path):
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.deploy.runtime import guard_for
    from keyedge.errors import KeyedgeError

    if not state.is_file():
        raise KeyedgeError(f"{state} is not a guard state file", "pass the file the device keeps (guard_state=...)")
    guard = guard_for(ArtifactManifest.read(artifact_set), state)
    if guard is None:
        raise KeyedgeError(f"{artifact_set}'s posture has no query guard or rate limit", "check --set")
    return guard


@guard_app.command("show")
def show(state: Path = STATE, artifact_set: Path = SET) -> None:
    """The guard's counters and whether it is locked."""
    guard = _open(state, artifact_set)
    counters = ", ".join(f"{name} {value:,}" for name, value in guard.counters.items())
    console.print(f"{state}: {'LOCKED' if guard.locked else 'answering'}; {counters}", markup=False)


@guard_app.command("unlock")
def unlock(state: Path = STATE, artifact_set: Path = SET) -> None:
    """Answer queries again after a lock (the history is kept, so the same attack is caught again)."""
    guard = _open(state, artifact_set)
    was = guard.locked
    guard.unlock()
    guard.save()
    console.print(f"{state}: {'unlocked' if was else 'was not locked'}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(guard_app, name="guard")
