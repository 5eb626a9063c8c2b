"""Benchmarks: `python -m bench` (see docs/benchmarks.md). Speed is measured here, never asserted in tests."""
