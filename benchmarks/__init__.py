"""Benchmarks (installed as ``keyedge.benchmarks``): each module runs with ``python -m keyedge.benchmarks.NAME``.

They print what they measured and compare ratios taken side by side in one run,
never absolute times across runs (machines here are shared and noisy).
"""
