"""Benchmarks and memory prediction at real size with random weights (`scripts/benchmark.py`)."""
