"""pytest setup: hypothesis profiles, the `gpu` marker's skip, and a fixed BLAS thread count."""

import os

# OpenBLAS rounds a product's sums differently at another thread count, and the default "auto"
# thread policy changes the count with the machine's load (minimask/backend.py). The tests
# compare runs bit for bit (exact resume), so they fix it, unless the caller already did.
os.environ.setdefault("MINIMASK_THREADS", "1")

import pytest
from hypothesis import HealthCheck, settings

from minimask.backend import gpu_available

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no GPU: CuPy is not installed or sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
