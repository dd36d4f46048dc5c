"""Datasets: synthetic shapes (``shapes``) and COCO in the official layout (``coco``)."""
