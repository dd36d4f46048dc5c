"""Datasets: synthetic shapes (and COCO, later)."""
