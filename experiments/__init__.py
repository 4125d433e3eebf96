"""Experiment manifests, the training/evaluation engine and the `python -m experiments` CLI."""
