"""Application layer: whole jobs built from the layers below -- the offline end-to-end quickstart
(:mod:`.quickstart`) and the installation report (:mod:`.doctor`).  The command line (:mod:`keyedge.cli`)
is the other application module; nothing below imports either."""
