"""Where the data sets live on this machine.

coco-mini (417 real COCO 2017 photos with their annotations, described in its own README) is not
part of the repository: its images carry their own Flickr licences. It sits beside the clone, at
``<repo>/../shared/data/coco-mini``; the environment variable ``MINIMASK_COCO_MINI`` points
elsewhere. Code that wants real photos asks :func:`coco_mini_root` and falls back to the synthetic
shapes (saying so) when it answers None.
"""

from __future__ import annotations

import os
from pathlib import Path

COCO_MINI_ENV = "MINIMASK_COCO_MINI"  # overrides the default location below
REPO_ROOT = Path(__file__).resolve().parents[2]  # minimask/data/paths.py -> the clone


def coco_mini_root() -> Path | None:
    """The coco-mini folder (holding ``annotations/``, ``train2017/``, ``val2017/``), or None.

    ``$MINIMASK_COCO_MINI`` when set, else ``<repo>/../shared/data/coco-mini``; None when that
    folder does not exist.
    """
    override = os.environ.get(COCO_MINI_ENV, "").strip()
    root = Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "coco-mini"
    return root if root.is_dir() else None
