"""Measurement tools of the course's maintainers: the recipe benchmark and the CPU speed probes.

Kept out of the teaching package ``helpers``; run them from the repository root, e.g.
``python -m benchmarks.bench`` (``make bench``). Results and analysis: docs/performance.md.
"""
