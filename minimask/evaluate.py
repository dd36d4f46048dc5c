"""COCO-style evaluation: bbox and segm AP, AP50 and AP75 through pycocotools.

AP (COCO's primary metric) averages precision over recall levels, classes, and ten IoU
thresholds 0.50:0.05:0.95; AP50 and AP75 fix the IoU threshold at 0.5 and 0.75 (Mask R-CNN §4,
Table 1). For ``segm`` the IoU is taken between masks, for ``bbox`` between boxes.

The ground truth of any dataset of samples (dicts with ``image``, ``boxes``, ``labels``,
``masks``, ``image_id``) becomes a COCO object in memory, the model's detections become a COCO
results list (boxes as [x, y, w, h], masks as RLE), and ``COCOeval`` does the rest.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask.engine import no_grad

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)  # fmt: skip  -- the 12 numbers of COCOeval.summarize(), in its order


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(D, H, W) binary masks -> COCO RLEs with ``counts`` as str (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(D, 4) (x1, y1, x2, y2) -> COCO's (x, y, width, height)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def ground_truth_coco(samples, class_names) -> COCO:
    """A pycocotools ``COCO`` object holding the targets of ``samples``."""
    images, annotations = [], []
    for s in samples:
        _, height, width = np.shape(s["image"])
        images.append({"id": int(s["image_id"]), "height": int(height), "width": int(width)})
        masks = np.asarray(s["masks"])
        crowd = np.asarray(s.get("is_crowd", np.zeros(len(masks), dtype=bool)))
        for box, label, rle, mask, is_crowd in zip(
            xyxy_to_xywh(s["boxes"]), s["labels"], encode_masks(masks), masks, crowd
        ):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": int(s["image_id"]),
                "category_id": int(label),
                "bbox": box.tolist(),
                "area": float(mask.sum()),
                "iscrowd": int(is_crowd),
                "segmentation": rle,
            })  # fmt: skip
    categories = [{"id": k, "name": n} for k, n in enumerate(class_names) if k > 0]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_results(image_id: int, det: dict) -> list[dict]:
    """One image's detections as COCO result entries (bbox and, when present, segmentation)."""
    rles = encode_masks(np.asarray(det["masks"])) if "masks" in det else None
    results = []
    for i, (box, score, label) in enumerate(
        zip(xyxy_to_xywh(det["boxes"]), det["scores"], det["labels"])
    ):
        entry = {
            "image_id": int(image_id),
            "category_id": int(label),
            "bbox": box.tolist(),
            "score": float(score),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        results.append(entry)
    return results


def coco_evaluate(gt: COCO, results: list[dict], iou_types=("bbox", "segm"), verbose=False):
    """Run ``COCOeval`` for each IoU type; returns ``{iou_type: {stat name: value}}``.

    With no detections at all, every number is 0 (pycocotools cannot load an empty result).
    """
    metrics = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(f"{iou_type}:\n{out.getvalue()}")
        metrics[iou_type] = {n: float(max(v, 0.0)) for n, v in zip(STAT_NAMES, ev.stats)}
    return metrics


@no_grad()
def predict_dataset(model, samples, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """The model's detections (host arrays) for every sample, in order."""
    from minimask.model.mask_rcnn import detections_to_host  # noqa: PLC0415 - avoid a cycle

    model.eval()
    samples = list(samples)
    batches = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        batches = tqdm(batches, desc="predict", dynamic_ncols=True)
    detections = []
    for start in batches:
        chunk = samples[start : start + batch_size]
        detections += detections_to_host(model([s["image"] for s in chunk]))
    return detections


def evaluate(model, samples, class_names, batch_size: int = 4, progress: bool = True):
    """bbox and segm COCO metrics of ``model`` on ``samples``; also returns the detections."""
    samples = list(samples)
    detections = predict_dataset(model, samples, batch_size, progress)
    results = []
    for s, det in zip(samples, detections):
        results += detections_to_results(s["image_id"], det)
    metrics = coco_evaluate(ground_truth_coco(samples, class_names), results)
    return metrics, detections
