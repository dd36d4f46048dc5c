"""Benchmarks against torch/torchvision: ``python -m minimask.bench {conv,ops}``.

Each prints one table from one run: minimask's time, the reference's time and their ratio. Times
are never asserted in tests; the latest tables live in ``docs/benchmarks.md``.
"""
