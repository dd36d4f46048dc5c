"""Tools for testing minimask itself: :mod:`minimask.testing.strict`, a CPU stand-in for CuPy."""
