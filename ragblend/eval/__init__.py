"""Evaluation: datasets, metrics, the quality harness, speed sweeps and plots."""
