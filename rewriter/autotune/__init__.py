"""Kernel autotuning: search spaces as data, timing, Optuna studies, a per-device cache.

Filled in by the autotuner work; kept as a subpackage so `rewriter.autotune` has one home.
"""
