"""Deployment: per-key export to every target with parity verified, written all or nothing, and opening and
checking what was deployed.  One job per module:

* :mod:`.export` -- ``export_one``/``export_many`` (and the public names callers import from it);
* :mod:`.settings` -- what to export (``ExportRequest``, ``ExportSettings``, pairing checkpoints with keys);
* :mod:`.targets` -- the per-target loop: export, inspect, verify, seal, and the set's manifest;
* :mod:`.verification` -- the reference logits and each artifact checked against them;
* :mod:`.parity` -- the parity rules and their typed result (``Parity``), as manifests record it;
* :mod:`.inputs` -- the images verification and int8 calibration run on;
* :mod:`.artifacts` -- the export directory's typed manifest (``ArtifactManifest``) and its file checks;
* :mod:`.torch_runner` -- the PyTorch reference runner artifacts are compared and timed against;
* :mod:`.runtime` -- opening a deployed set, sealed or plain (``keyedge.runtime`` is its device-side name);
* :mod:`.verify` -- ``keyedge verify``: files, signature, parity of a deployed set.

The targets themselves are backends in :mod:`keyedge.exporters`."""
