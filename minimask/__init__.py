"""minimask: a from-scratch, teachable Mask R-CNN on NumPy and CuPy."""

__version__ = "0.1.0"
