"""Measurements of re2g's indexing and retrieval (issue 3): each benchmark prints a table and writes
``bench_out/<name>.json`` with its figures and same-run ratios. ``python -m benchmarks.run_all``
runs them in order. They are measurements, never timed tests."""
