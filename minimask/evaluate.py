"""COCO-style evaluation: bbox, segm and keypoint AP, AP50 and AP75 through pycocotools.

AP (COCO's primary metric) averages precision over recall levels, classes, and ten IoU
thresholds 0.50:0.05:0.95; AP50 and AP75 fix the IoU threshold at 0.5 and 0.75 (Mask R-CNN §4,
Table 1). For ``segm`` the IoU is taken between masks, for ``bbox`` between boxes, and for
``keypoints`` (Mask R-CNN §5, Table 4) it is the object keypoint similarity
``OKS = mean over labelled keypoints of exp(-d² / (2 s² k²))``: d the distance between the
predicted and the true keypoint, s² the object's area, ``k = 2σ`` a per-keypoint constant
(COCO's 17 sigmas by default; another skeleton brings its own).

The ground truth of any dataset of samples (dicts with ``image``, ``boxes``, ``labels``,
``masks``, ``image_id``, optionally ``keypoints`` and ``areas``) becomes a COCO object in memory,
the model's detections become a COCO results list (boxes as [x, y, w, h], masks as RLE,
keypoints as flat [x, y, v] * K), and ``COCOeval`` does the rest.

A number can be absent: ``COCOeval`` writes -1 where no object falls in an area range (APs on a
dataset without small objects, say). Such a number is ``None`` in the metrics (``null`` in JSON)
and ``n/a`` in tables (:func:`format_stat`), never 0, which would read as a detector that finds
none of the small objects there are.
"""

from __future__ import annotations

import contextlib
import io
import json

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
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# -- the 10 numbers of COCOeval.summarize() for keypoints (no small objects: too few keypoints)


def format_stat(value: float | None, spec: str = ".3f") -> str:
    """One metric for a table: ``format(value, spec)``, or ``n/a`` where it is absent (None)."""
    return "n/a" if value is None else format(value, spec)


def encode_masks(masks) -> list[dict]:
    """(D, H, W) binary masks -> COCO RLEs with ``counts`` as str (JSON-ready).

    One mask at a time: pycocotools wants column-major (H, W, 1) arrays, and copying a whole
    stack of full-size masks at once would double its memory.
    """
    rles = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)[:, :, None]))[0]
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(D, 4) (x1, y1, x2, y2) -> COCO's (x, y, width, height)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def ground_truth_coco(samples, class_names, keypoint_names=None, skeleton=None) -> COCO:
    """A pycocotools ``COCO`` object holding the targets of ``samples``.

    Each annotation's ``area`` is the sample's ``areas`` entry when it has one, else its mask's
    pixel count (else its box's). Samples with ``keypoints`` (G, K, 3) give each annotation its
    flat ``keypoints`` and ``num_keypoints`` (the labelled ones), and the categories the
    ``keypoint_names`` and ``skeleton`` (0-based pairs, written 1-based as COCO does).
    """
    images, annotations = [], []
    for s in samples:
        _, height, width = np.shape(s["image"])
        images.append({"id": int(s["image_id"]), "height": int(height), "width": int(width)})
        boxes = xyxy_to_xywh(s["boxes"])
        count = len(boxes)
        masks = np.asarray(s["masks"]) if s.get("masks") is not None else None
        rles = encode_masks(masks) if masks is not None else [None] * count
        if s.get("areas") is not None:
            areas = np.asarray(s["areas"], dtype=np.float64)
        elif masks is not None:
            areas = masks.sum(axis=(-2, -1), dtype=np.float64)  # (G,), also for G = 0
        else:
            areas = boxes[:, 2] * boxes[:, 3]
        crowd = np.asarray(s.get("is_crowd", np.zeros(count, dtype=bool)))
        keypoints = s.get("keypoints")
        for g in range(count):
            entry = {
                "id": len(annotations) + 1,
                "image_id": int(s["image_id"]),
                "category_id": int(s["labels"][g]),
                "bbox": boxes[g].tolist(),
                "area": float(areas[g]),
                "iscrowd": int(crowd[g]),
            }
            if rles[g] is not None:
                entry["segmentation"] = rles[g]
            if keypoints is not None:
                kp = np.asarray(keypoints[g], dtype=np.float64)  # (K, 3)
                entry["keypoints"] = kp.reshape(-1).tolist()
                entry["num_keypoints"] = int((kp[:, 2] > 0).sum())
            annotations.append(entry)
    categories = [{"id": k, "name": n} for k, n in enumerate(class_names) if k > 0]
    if keypoint_names is not None:
        pairs = [[a + 1, b + 1] for a, b in (skeleton or ())]
        for c in categories:
            c.update(keypoints=list(keypoint_names), skeleton=pairs)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_results(image_id: int, det: dict) -> list[dict]:
    """One image's detections as COCO result entries (bbox and, when present, segmentation and
    keypoints: flat [x, y, v] * K, scored by the detection's score, as torchvision's reference
    evaluation does)."""
    rles = encode_masks(np.asarray(det["masks"])) if "masks" in det else None
    keypoints = np.asarray(det["keypoints"], np.float64) if "keypoints" in det else None
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
        if keypoints is not None:
            entry["keypoints"] = keypoints[i].reshape(-1).tolist()
        results.append(entry)
    return results


def run_cocoeval(gt: COCO, results: list[dict], iou_type: str, image_ids=None,
                 category_ids=None, sigmas=None) -> tuple[COCOeval, str]:  # fmt: skip
    """``COCOeval`` of one IoU type, run quietly; returns it and its printed 12-line summary.

    ``image_ids`` / ``category_ids`` restrict the evaluation (default: every image and category
    of ``gt``), e.g. to the images that were actually read. For ``segm`` the entries' ``bbox``
    is dropped first, so that pycocotools takes each detection's area from its mask (as the
    COCO and Detectron evaluations do), not from its box. For ``keypoints``, ``sigmas`` (K,)
    replace COCO's 17 per-keypoint OKS constants (another skeleton). ``results`` is not modified.
    """
    results = [dict(r) for r in results]  # loadRes writes ids and areas into the entries
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev = COCOeval(gt, gt.loadRes(results) if results else _no_detections(gt), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        if category_ids is not None:
            ev.params.catIds = sorted(int(c) for c in category_ids)
        if iou_type == "keypoints" and sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return ev, out.getvalue()


def _no_detections(gt: COCO) -> COCO:
    """An empty results set for ``gt`` (``COCO.loadRes`` cannot load an empty list)."""
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                     "categories": list(gt.dataset["categories"])}  # fmt: skip
    empty.createIndex()
    return empty


def coco_evaluate(gt: COCO, results: list[dict], iou_types=("bbox", "segm"), verbose=False,
                  image_ids=None, category_ids=None, evals: dict | None = None,
                  sigmas=None):  # fmt: skip
    """Run ``COCOeval`` for each IoU type; returns ``{iou_type: {stat name: value}}``.

    A value is None where COCOeval has none (module docstring). With no detections at all, every
    number that exists is 0. ``verbose`` prints COCOeval's standard 12-number summary of each
    type; ``evals``, when a dict, receives each type's ``COCOeval`` when there are detections
    (for :func:`save_pr_curves`). ``sigmas``: the keypoints' OKS constants (see
    :func:`run_cocoeval`); the ``keypoints`` type reports :data:`KEYPOINT_STAT_NAMES`.
    """
    metrics = {}
    for iou_type in iou_types:
        ev, summary = run_cocoeval(gt, results, iou_type, image_ids, category_ids, sigmas)
        if verbose:
            print(f"{iou_type}:\n{summary}")
        if evals is not None and results:
            evals[iou_type] = ev
        # COCOeval's -1: no ground truth to measure against
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
        metrics[iou_type] = {n: None if v < 0 else float(v) for n, v in zip(names, ev.stats)}
    return metrics


def write_results_json(path: str, results: list[dict]) -> None:
    """Write detections in COCO's results format (a JSON list), readable by ``COCO.loadRes``."""
    with open(path, "w") as f:
        json.dump(results, f)


def save_pr_curves(evals: dict, path: str) -> None:
    """Precision against recall at IoU 0.5 and 0.75 (all areas, 100 detections), per IoU type.

    Each curve is COCOeval's interpolated precision at 101 recall levels, averaged over the
    categories that have ground truth (``eval["precision"]`` is (T, R, K, A, M)).
    """
    from minimask.visualize import new_figure  # noqa: PLC0415 - plotting only when asked

    fig = new_figure((5 * max(len(evals), 1), 4))
    axes = fig.subplots(1, max(len(evals), 1), squeeze=False)
    for ax, (iou_type, ev) in zip(axes[0], evals.items()):
        precision = ev.eval["precision"]  # (T, R, K, A, M)
        recall = ev.params.recThrs
        for iou in (0.5, 0.75):
            t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
            p = precision[t, :, :, 0, -1]  # (R, K): area "all", the largest maxDets
            valid = (p > -1).all(axis=0)
            curve = p[:, valid].mean(axis=1) if valid.any() else np.zeros_like(recall)
            ap = float(curve.mean())
            ax.plot(recall, curve, label=f"IoU {iou:.2f} (AP {ap:.3f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=iou_type)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
