"""The Mask R-CNN model, one module per component (see docs/architecture.md)."""
