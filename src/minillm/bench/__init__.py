"""Benchmarks shipped with the package, so `minillm bench` works on a fresh install."""
