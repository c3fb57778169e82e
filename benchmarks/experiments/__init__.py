"""Experiments: scripts that answer one question each and print what they measured.

Run one with ``python -m keyedge.benchmarks.experiments.NAME --help``.  They use the harnesses of
:mod:`keyedge.benchmarks` (latency, robustness, workbench, timing); nothing in the product imports them
(``tests/test_layers.py`` checks that).
"""
