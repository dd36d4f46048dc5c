"""The components of Mask R-CNN, one module per piece of the paper (anchors, boxes, losses...)."""
