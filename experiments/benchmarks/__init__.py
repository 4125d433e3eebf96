"""Benchmark scripts: they print timings and ratios measured in one run (never asserted in tests)."""
