"""``keyedge fleet``: N devices, N keys, N fine-tunes, N verified artifact sets -- one resumable command group.

A fleet directory holds::

    fleet.json            the fleet manifest: device names <-> key fingerprints <-> checkpoints <-> artifacts
    keys/NAME.bin         one secret key per device (0600; never copied into any manifest)
    runs/NAME/            one checkpoint per device (``keyedge train``'s format)
    artifacts/MODEL-FP/   one verified artifact set per device (``keyedge export``'s format)
    logs/NAME.STAGE.log   what each job said
    report/               ``fleet report``: fleet-report.md, fleet-report.json, accuracy.png

Each stage (train, export, verify, report) looks at what is on disk, never only at
the manifest, and does only what is missing or stale: a checkpoint is finished when its
manifest has the recipe's epochs and the device's fingerprint (an unfinished one is resumed);
an artifact set is current when its manifest names the SHA-256 of the device's checkpoint
manifest, holds the requested targets and every file matches its SHA-256; a verification is
current when it was run on the artifact manifest with today's SHA-256.  So a rerun after a
failure, a Ctrl-C or a killed driver redoes nothing that finished.  ``fleet.json`` is rewritten
(atomically) after every finished job, and only one ``keyedge fleet`` command works on a fleet
at a time (a lock file).

Per-key jobs run on an engine (:mod:`keyedge.app.engine`): this machine, or Ray tasks.

The package, by job: :mod:`.manifest` (``fleet.json`` and the lock), :mod:`.create` (``fleet init``),
:mod:`.state` (what is done, from the disk), :mod:`.jobs` (one key's step, as an engine runs it),
:mod:`.stages` (train, export, verify, report over the fleet) and :mod:`.report` (the fleet table).
"""

from __future__ import annotations

from keyedge.app.fleet.create import device_names, init_fleet
from keyedge.app.fleet.manifest import (
    FLEET_MANIFEST,
    FLEET_SCHEMA,
    Device,
    FleetManifest,
    Recipe,
    fleet_lock,
    read_fleet,
)
from keyedge.app.fleet.report import build_report, to_markdown, write_report
from keyedge.app.fleet.stages import StageResult, export_stage, report_stage, train_stage, verify_stage
from keyedge.app.fleet.state import checkpoint_state, export_state, status_rows

__all__ = [
    "FLEET_MANIFEST",
    "FLEET_SCHEMA",
    "Device",
    "FleetManifest",
    "Recipe",
    "StageResult",
    "build_report",
    "checkpoint_state",
    "device_names",
    "export_stage",
    "export_state",
    "fleet_lock",
    "init_fleet",
    "read_fleet",
    "report_stage",
    "status_rows",
    "to_markdown",
    "train_stage",
    "verify_stage",
    "write_report",
]
