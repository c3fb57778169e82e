"""Deployment: per-key export to every target with parity verified, written all or nothing
(:mod:`.export`), the export directory's typed manifest (:mod:`.artifacts`), and the PyTorch reference
runner artifacts are compared with.  The targets themselves are backends in :mod:`keyedge.exporters`."""
