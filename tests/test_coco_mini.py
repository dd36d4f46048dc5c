"""The COCO pipeline on real photos: coco-mini (337 train / 80 val COCO 2017 images).

coco-mini is not in the repository (its images keep their Flickr licences): it is read from
``<repo>/../shared/data/coco-mini``, or from ``$MINIMASK_COCO_MINI``. Where it is absent, every
test here is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from minimask.data.coco import CocoBatches, CocoDataset
from minimask.evaluate import coco_evaluate, detections_to_results
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.train import TrainConfig, fit
from minimask.workflow import coco_model_config

ROOT = Path(
    os.environ.get("MINIMASK_COCO_MINI")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
)
pytestmark = [
    pytest.mark.skipif(
        not (ROOT / "annotations" / "instances_val2017.json").is_file(),
        reason=f"coco-mini not found at {ROOT} (set MINIMASK_COCO_MINI to its folder)",
    ),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def val():
    return CocoDataset.from_root(str(ROOT), "val2017", keep_empty=True)


def test_masks_match_ann_to_mask(val):
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCO(str(ROOT / "annotations" / "instances_val2017.json"))
    assert len(val) == 80 and val.num_classes == 81 and not val.problems
    crowds = 0
    for i in range(0, len(val), 2):  # every other image: 40 photos, ~400 masks
        s = val.target(val.image_ids[i])
        anns = ref.loadAnns(ref.getAnnIds(imgIds=s["image_id"]))
        assert len(anns) == len(s["masks"])
        for g, a in enumerate(anns):
            np.testing.assert_array_equal(s["masks"][g], ref.annToMask(a), err_msg=f"ann {a['id']}")
            assert ref.cats[a["category_id"]]["name"] == val.classes[s["labels"][g]]
        crowds += int(s["is_crowd"].sum())
    assert crowds > 0  # crowd RLEs were among them


def test_ground_truth_as_detections_scores_ap_1(val):
    results = []
    for image_id in val.image_ids:
        t = val.target(image_id)
        real = ~t["is_crowd"]
        det = {"boxes": t["boxes"][real], "scores": np.ones(real.sum()),
               "labels": val.category_ids[t["labels"][real] - 1],  # COCO ids
               "masks": t["masks"][real]}  # fmt: skip
        results += detections_to_results(image_id, det)
    metrics = coco_evaluate(val.coco, results)
    for task in ("bbox", "segm"):
        assert metrics[task]["AP"] == pytest.approx(1.0), task
        assert metrics[task]["AR100"] == pytest.approx(1.0), task


def test_a_short_training_run_lowers_the_loss(tmp_path):
    """Fit four real photos at 128 pixels: the loss falls within 18 steps (15-30 s)."""
    train = CocoDataset.from_root(str(ROOT), "train2017", categories="person")
    batches = CocoBatches(train, batch_size=2, flip=False)
    fixed = [batches(0), batches(1)]  # four photos of people, used again and again
    init.manual_seed(0)
    model = MaskRCNN(coco_model_config("tiny", train.num_classes, 128, 160))
    config = TrainConfig(iterations=18, lr=0.01, warmup_iters=4, checkpoint_every=100)
    records = fit(model, lambda i: fixed[i % 2], config, str(tmp_path), progress=False)
    totals = np.array([r["total"] for r in records])
    assert np.isfinite(totals).all()
    assert totals[-6:].mean() < 0.75 * totals[:6].mean(), totals.round(3)
