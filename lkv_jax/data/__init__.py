"""Benchmark and training data: the built-in word-level vocabulary, RULER-style synthetic tasks and metrics."""
