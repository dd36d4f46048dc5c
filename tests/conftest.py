"""pytest setup: hypothesis profiles and the `gpu` marker's skip."""

import os

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
