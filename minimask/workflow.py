"""One path from data to a trained, evaluated model: train, evaluate and predict, for any data.

The synthetic shapes, the synthetic stick figures (keypoints) and a COCO-format dataset are
**data adapters** with the same small interface; everything else (building the model, the
training loop, predicting, COCO metrics, the files written) is one code path:

    data.model_config(preset, min_size, max_size, pretrained)   the preset, the data's classes
    data.meta()                                      classes and dataset facts kept in checkpoints
    data.train_batches(seed, batch_size)             i -> (images, targets), deterministic in i
    data.eval_set(meta)                              images to evaluate on, with a COCO ground truth

Images and targets always travel at the size they are stored; the model resizes them itself
(:mod:`minimask.model.transform`) and answers in their pixels.

A model's labels are 1..K-1; ``meta["category_ids"][label - 1]`` is the id written into COCO
results (COCO's own category ids, or the label itself for the shapes and for torchvision's
91-class weights).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict

import numpy as np

from minimask.backend import check_device
from minimask.data import figures
from minimask.data.coco import BadImageError, CocoBatches, CocoDataset, DataProblems
from minimask.data.shapes import CLASSES, ShapesConfig, ShapesDataset, shapes_batches
from minimask.engine import no_grad
from minimask.evaluate import (
    STAT_NAMES,
    coco_evaluate,
    detections_to_results,
    encode_masks,
    format_stat,
    ground_truth_coco,
    save_pr_curves,
    write_results_json,
)
from minimask.model.checkpoint import build_model
from minimask.model.config import MaskRCNNConfig, get_config
from minimask.model.mask_rcnn import MaskRCNN, detections_to_host
from minimask.train import TrainConfig, fit

COCO_MIN_SIZE, COCO_MAX_SIZE = 320, 533  # COCO photos on a CPU: the paper's 800/1333 times 0.4


# ---------------------------------------------------------------------------- the adapters
class EvalSet:
    """Images to evaluate on: ``load(i)`` gives sample ``i`` (or raises ``BadImageError``), and
    ``gt`` is their ground truth as a pycocotools ``COCO`` object, with real category ids;
    ``sigmas`` are the keypoints' OKS constants (None: COCO's 17)."""

    def __init__(self, load, count: int, gt, category_ids, source: str, sigmas=None):
        self.load, self.count, self.gt = load, count, gt
        self.category_ids, self.source, self.sigmas = list(category_ids), source, sigmas


class ShapesData:
    """The synthetic shapes: an endless training stream and a fixed validation split."""

    name = "shapes"

    def __init__(self, val_images: int = 100, val_seed: int = 0,
                 shapes: ShapesConfig | None = None):  # fmt: skip
        """``shapes``: the generator's settings (object sizes, counts) for both splits."""
        self.val_images, self.val_seed = val_images, val_seed
        self.shapes = shapes or ShapesConfig()

    def model_config(self, preset: str, min_size=None, max_size=None,
                     pretrained: bool = False) -> MaskRCNNConfig:  # fmt: skip
        sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v}
        return get_config(preset, num_classes=len(CLASSES), **sizes)

    def meta(self) -> dict:
        return {"dataset": "shapes", "classes": list(CLASSES),
                "category_ids": list(range(1, len(CLASSES)))}  # fmt: skip

    def train_batches(self, seed: int, batch_size: int):
        return shapes_batches(seed, batch_size, self.shapes)

    def eval_set(self, meta: dict) -> EvalSet:
        samples = list(ShapesDataset(self.val_images, seed=self.val_seed, config=self.shapes))
        gt = ground_truth_coco(samples, CLASSES)
        return EvalSet(samples.__getitem__, len(samples), gt, range(1, len(CLASSES)), "shapes")


class FiguresData:
    """The synthetic stick figures (:mod:`minimask.data.figures`): one class, 7 keypoints."""

    name = "figures"

    def __init__(self, val_images: int = 100, val_seed: int = 0):
        self.val_images, self.val_seed = val_images, val_seed

    def model_config(self, preset: str, min_size=None, max_size=None,
                     pretrained: bool = False) -> MaskRCNNConfig:  # fmt: skip
        sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v}
        if preset.startswith("tiny") and not get_config(preset).num_keypoints:
            # a CPU preset without a keypoint head gets tiny_keypoints' small one, not the
            # paper's eight 512-channel convs (25 s a step on 2 cores instead of 0.5 s)
            sizes["keypoint_conv_channels"] = get_config("tiny_keypoints").keypoint_conv_channels
        return get_config(preset, num_classes=len(figures.CLASSES),
                          num_keypoints=len(figures.KEYPOINT_NAMES), **sizes)  # fmt: skip

    def meta(self) -> dict:
        return {"dataset": "figures", "classes": list(figures.CLASSES), "category_ids": [1],
                "keypoint_names": list(figures.KEYPOINT_NAMES),
                "skeleton": [list(p) for p in figures.SKELETON],
                "kpt_oks_sigmas": list(figures.OKS_SIGMAS)}  # fmt: skip

    def train_batches(self, seed: int, batch_size: int):
        return figures.figures_batches(seed, batch_size)

    def eval_set(self, meta: dict) -> EvalSet:
        samples = list(figures.FiguresDataset(self.val_images, seed=self.val_seed))
        gt = ground_truth_coco(samples, figures.CLASSES, figures.KEYPOINT_NAMES, figures.SKELETON)
        return EvalSet(samples.__getitem__, len(samples), gt, [1], "figures",
                       sigmas=figures.OKS_SIGMAS)  # fmt: skip


def coco_model_config(preset: str, num_classes: int, min_size: int = COCO_MIN_SIZE,
                      max_size: int = COCO_MAX_SIZE,
                      pretrained: bool = False) -> MaskRCNNConfig:  # fmt: skip
    """``preset`` sized for COCO photos at ``min_size`` and ``num_classes`` (background included).

    For ``tiny`` and ``tiny_c4`` (built for 128-pixel shapes) the anchors grow to 16..256 pixels,
    the inputs are normalised with the ImageNet mean/std, and 100 detections are kept (COCO's
    AR@100). For the ResNet-50/101 presets trained from scratch (not ``pretrained``), frozen
    BatchNorm becomes GroupNorm, as
    in He et al., "Rethinking ImageNet Pre-training" (2019), the recipe that trains Mask R-CNN
    R50-FPN from random weights; loaded weights bring their own BatchNorm statistics.
    """
    changes = {"num_classes": num_classes, "min_size": min_size, "max_size": max_size}
    if get_config(preset).norm == "frozen_bn" and not pretrained:
        changes.update(norm="group_norm")
    if preset.startswith("tiny"):
        photo = MaskRCNNConfig()
        changes.update(anchor_sizes=(16, 32, 64, 128, 256), image_mean=photo.image_mean,
                       image_std=photo.image_std, detections_per_image=100)  # fmt: skip
    return get_config(preset, **changes)


class CocoData:
    """A COCO-format dataset, ``ROOT/annotations/instances_<split>.json`` + ``ROOT/<split>/``."""

    name = "coco"

    def __init__(self, root: str, split: str, categories=None, keep_empty: bool = False,
                 flip: bool = True, keypoints: bool = False):  # fmt: skip
        self.root, self.split, self.flip = root, split, flip
        self.categories, self.keep_empty = categories, keep_empty
        self.keypoints = keypoints  # person_keypoints_<split>.json instead of instances_

    @functools.cached_property
    def dataset(self) -> CocoDataset:
        """The training view: the chosen categories, images with annotations (read once)."""
        return CocoDataset.from_root(self.root, self.split, categories=self.categories,
                                     keep_empty=self.keep_empty,
                                     keypoints=self.keypoints)  # fmt: skip

    def model_config(self, preset: str, min_size=None, max_size=None,
                     pretrained: bool = False) -> MaskRCNNConfig:  # fmt: skip
        config = coco_model_config(preset, self.dataset.num_classes, min_size or COCO_MIN_SIZE,
                                   max_size or COCO_MAX_SIZE, pretrained)  # fmt: skip
        if self.keypoints:
            config = config.replace(num_keypoints=len(self.dataset.keypoint_names))
        return config

    def meta(self) -> dict:
        meta = {"dataset": "coco", "root": os.path.abspath(self.root), "split": self.split,
                "classes": self.dataset.classes,
                "category_ids": self.dataset.category_ids.tolist()}  # fmt: skip
        if self.keypoints:
            meta.update(keypoint_names=list(self.dataset.keypoint_names),
                        skeleton=[list(p) for p in self.dataset.skeleton])  # fmt: skip
        return meta

    def train_batches(self, seed: int, batch_size: int) -> CocoBatches:
        return CocoBatches(self.dataset, batch_size, seed, self.flip)

    def eval_set(self, meta: dict) -> EvalSet:
        """Every image of the split (with or without annotations), scored on the categories the
        model knows (those of ``meta["category_ids"]`` that the JSON has)."""
        every = CocoDataset.from_root(self.root, self.split, keep_empty=True,
                                      keypoints=self.keypoints)  # fmt: skip
        wanted = [c for c in meta["category_ids"] if c in set(every.category_ids.tolist())]
        if not wanted:
            raise ValueError(f"{every.annotation_file} has none of the model's categories "
                             f"{meta['category_ids'][:5]}...")  # fmt: skip
        return EvalSet(every.__getitem__, len(every), every.coco, wanted, every.image_dir)


# ---------------------------------------------------------------------------- train
def train(data, preset: str, config: TrainConfig, batch_size: int, out_dir: str,
          resume: bool = False, weights: str | None = None, backbone_weights: str | None = None,
          min_size: int | None = None, max_size: int | None = None, progress: bool = True,
          log=print, overwrite: bool = False, device: str | None = None,
          config_changes: dict | None = None, schedule: str = "joint",
          step_iterations=None) -> MaskRCNN:  # fmt: skip
    """Train ``preset`` on ``data`` (an adapter above) with :func:`minimask.train.fit`.

    ``config_changes`` are model config fields set last (``{"pooler": "roi_pool"}``: the CLI's
    ``--set``), after the data adapter has sized the preset.
    ``resume`` continues the run in ``out_dir``; ``overwrite`` replaces it; with neither, a
    folder that already holds a run is refused (:class:`minimask.train.RunExistsError`).
    ``device`` (``"cpu"``/``"gpu"``, default ``MINIMASK_DEVICE``) is where the model trains;
    batches stay on the host until the model's transform uploads them.

    ``schedule`` is ``"joint"`` (every loss at once, ``config.iterations`` steps) or
    ``"alternating"``: :mod:`minimask.alternating`'s four steps of ``step_iterations``
    iterations (default: ``config.iterations`` split in four).
    """
    if schedule not in ("joint", "alternating"):
        raise ValueError(f"schedule={schedule!r}; use 'joint' or 'alternating'")
    model_config = data.model_config(preset, min_size, max_size, bool(weights or backbone_weights))
    model_config = model_config.replace(**(config_changes or {}))
    device = check_device(device)

    built = []  # alternating training builds several: only the first says what it loaded

    def new_model() -> MaskRCNN:
        notes = log if not built else (lambda _: None)
        built.append(True)
        model = build_model(model_config, config.seed, weights, backbone_weights, notes)
        return model.to(device)  # before fit builds the optimizer: its state goes there too

    meta = {"preset": preset, "batch_size": batch_size, "model_config": asdict(model_config),
            "weights": weights, "backbone_weights": backbone_weights, **data.meta()}  # fmt: skip
    c = model_config
    log(f"training {preset} on {data.name} ({len(meta['classes']) - 1} classes) at shorter "
        f"side {c.min_size} (longer <= {c.max_size}), batch {batch_size}")  # fmt: skip
    batches = data.train_batches(config.seed, batch_size)
    start = time.perf_counter()
    if schedule == "alternating":
        from minimask.alternating import step_configs, train_alternating  # noqa: PLC0415

        steps = step_configs(config, step_iterations)
        iterations = sum(s.iterations for s in steps)
        model = train_alternating(new_model, batches, steps, out_dir, resume, progress, meta,
                                  overwrite, log)  # fmt: skip
    else:
        model, iterations = new_model(), config.iterations
        fit(model, batches, config, out_dir, resume, progress, meta, overwrite=overwrite, log=log)
    seconds = time.perf_counter() - start
    log(f"trained in {seconds:.0f} s ({seconds / max(iterations, 1):.2f} s/iteration)")
    problems = getattr(batches, "problems", None)
    if problems:
        log(problems.summary())
    return model


# ---------------------------------------------------------------------------- predict and evaluate
def to_results(image_id: int, det: dict, category_ids) -> list[dict]:
    """One image's detections as COCO results, labels 1..K-1 turned into ``category_ids``."""
    ids = np.asarray(category_ids, dtype=np.int64)
    return detections_to_results(image_id, {**det, "labels": ids[np.asarray(det["labels"]) - 1]})


@no_grad()
def predict_set(model: MaskRCNN, eval_set: EvalSet, category_ids, count: int | None = None,
                batch_size: int = 2, progress: bool = True, keep: int = 0):  # fmt: skip
    """Detections for the first ``count`` images of ``eval_set``, as COCO results.

    Returns ``(results, image_ids, problems, shown)``: the results (``category_ids`` applied),
    the ids of the images read, the bad images skipped, and the first ``keep`` (sample,
    detection) pairs for drawing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1 (or None for every image), got {count}")
    model.eval()
    problems = DataProblems(f"images of {eval_set.source}")
    results, image_ids, shown = [], [], []
    count = eval_set.count if count is None else min(count, eval_set.count)
    chunks = [range(k, min(k + batch_size, count)) for k in range(0, count, batch_size)]
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        chunks = tqdm(chunks, desc="predict", dynamic_ncols=True)
    for chunk in chunks:
        samples = []
        for index in chunk:
            try:
                samples.append(eval_set.load(index))
            except BadImageError as e:
                problems.add("bad image skipped", str(e))
        if not samples:
            continue
        detections = detections_to_host(model([s["image"] for s in samples]))
        for s, det in zip(samples, detections):  # at the stored image size
            results += to_results(s["image_id"], det, category_ids)
            image_ids.append(s["image_id"])
            if len(shown) < keep:
                shown.append((s, det))
    return results, image_ids, problems, shown


def iou_types(config: MaskRCNNConfig) -> tuple[str, ...]:
    """What a model can be scored on: boxes always, masks and keypoints when it has those heads."""
    return ("bbox",) + ("segm",) * config.has_masks + ("keypoints",) * bool(config.num_keypoints)


def evaluate(model: MaskRCNN, meta: dict, data, out_dir: str, max_images: int | None = None,
             batch_size: int = 2, progress: bool = True, log=print) -> dict:  # fmt: skip
    """COCO bbox, segm and keypoint metrics of ``model`` on ``data``'s evaluation images (those
    of :func:`iou_types`).

    Writes to ``out_dir``: ``results_<split>.json`` (COCO results), ``metrics.json``,
    ``pr_curves.png`` (precision / recall at IoU 0.5 and 0.75) and ``predictions.png``.

    Raises:
        ValueError: no image could be read (an empty split, or every file bad); nothing is
            written then, since metrics of no image would read as a model that finds nothing.
    """
    from minimask.visualize import save_predictions_figure  # noqa: PLC0415

    eval_set = data.eval_set(meta)
    start = time.perf_counter()
    results, image_ids, problems, shown = predict_set(
        model, eval_set, meta["category_ids"], max_images, batch_size, progress, keep=8
    )
    seconds = time.perf_counter() - start
    if not image_ids:
        why = "; ".join(line.strip() for line in problems.summary().splitlines()[1:])
        raise ValueError(f"no image to evaluate: {eval_set.source} has {eval_set.count} images"
                         + (f", none readable ({why})" if problems else ""))  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, f"results_{getattr(data, 'split', data.name)}.json")
    write_results_json(results_path, results)
    log(f"{len(results)} detections on {len(image_ids)} images in {seconds:.0f} s "
        f"-> {results_path}")  # fmt: skip
    evals: dict = {}
    metrics = coco_evaluate(eval_set.gt, results, iou_types(model.config), image_ids=image_ids,
                            category_ids=eval_set.category_ids, evals=evals,
                            sigmas=eval_set.sigmas)  # fmt: skip
    pr_path = os.path.join(out_dir, "pr_curves.png")
    if evals:
        save_pr_curves(evals, pr_path)
    else:
        if os.path.exists(pr_path):
            os.remove(pr_path)  # a stale plot of an earlier run would mislead
        log("no detections at all: every metric is 0 or n/a (and no pr_curves.png)")
    if shown:
        samples, dets = zip(*shown)
        save_predictions_figure(os.path.join(out_dir, "predictions.png"), samples, dets,
                                meta["classes"], skeleton=meta.get("skeleton"))  # fmt: skip
    if problems:
        log(problems.summary())
    record = {"dataset": data.name, "images": len(image_ids),
              "skipped": sum(problems.counts.values()), "seconds": round(seconds, 1),
              **metrics}  # fmt: skip
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    return metrics


def summary_table(metrics: dict, names=STAT_NAMES) -> str:
    """The chosen COCO numbers of each IoU type as a Markdown table."""
    rows = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task, m in metrics.items():
        rows.append(f"| {task} | " + " | ".join(format_stat(m.get(n)) for n in names) + " |")
    return "\n".join(rows)


def skeleton_of(meta: dict, model: MaskRCNN):
    """The keypoint pairs to draw as lines: the data's skeleton, or for 17 keypoints without one
    (torchvision's weights), COCO's person skeleton; None for a model without keypoints."""
    if not model.config.num_keypoints:
        return None
    if meta.get("skeleton") is not None:
        return meta["skeleton"]
    from minimask.visualize import COCO_PERSON_SKELETON  # noqa: PLC0415

    return COCO_PERSON_SKELETON if model.config.num_keypoints == 17 else ()


# ---------------------------------------------------------------------------- image files
def image_id_of(path: str, position: int) -> int:
    """COCO's file names are their ids (``000000000139.jpg`` is image 139); others count 1, 2..."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else position


def image_ids_of(paths) -> list[int]:
    """An id per file by :func:`image_id_of`; when two would be equal (``7.png`` and ``7.jpg``,
    or ``2.png`` and the second file of the list), every file is numbered by its position."""
    ids = [image_id_of(path, position) for position, path in enumerate(paths, start=1)]
    return ids if len(set(ids)) == len(ids) else list(range(1, len(ids) + 1))


def output_names(paths) -> list[str]:
    """A distinct name for each input file's drawing, so that none overwrites another.

    The file's stem (``photos/a.png`` -> ``a``); a stem already taken by an earlier file of the
    list gets ``_2``, ``_3``... (``a.png``, ``a.jpg`` -> ``a``, ``a_2``).
    """
    taken, names = set(), []
    for path in paths:
        stem = name = os.path.splitext(os.path.basename(path))[0]
        copy = 1
        while name in taken:
            copy += 1
            name = f"{stem}_{copy}"
        taken.add(name)
        names.append(name)
    return names


@no_grad()
def predict_files(model: MaskRCNN, meta: dict, paths, out_dir: str, score_thresh: float = 0.5,
                  log=print) -> tuple[list[str], list[str]]:  # fmt: skip
    """Detect in each image file; draw the detections and write them all as COCO results.

    Writes ``<name>_pred.png`` per image (names from :func:`output_names`) and
    ``detections.json``: every detection the model returns (``bbox`` [x, y, w, h] in the image's
    pixels, ``score``, ``category_id``, ``segmentation`` as RLE, ``keypoints`` [x, y, v] * K when
    the model has those heads), with ``image_id``
    (:func:`image_ids_of`) and ``file_name`` naming its image.

    A file that cannot be read (missing, not an image, truncated) is skipped and the others are
    still predicted. Returns ``(written, skipped)``: the paths written, and one message per
    skipped file naming it.

    Raises:
        ValueError: no file could be read; nothing is written then.
    """
    from minimask.data.images import read_image_for_model, to_file_pixels  # noqa: PLC0415
    from minimask.visualize import draw_detections, new_figure  # noqa: PLC0415

    model.eval()
    written, skipped, results = [], [], []
    for path, image_id, name in zip(paths, image_ids_of(paths), output_names(paths)):
        try:  # (3, H, W) in [0, 1]; a large JPEG decoded reduced, no smaller than the model needs
            image, scale, file_size = read_image_for_model(path, model.config.max_size)
        except BadImageError as e:
            skipped.append(str(e))  # the message names the file
            continue
        height, width = image.shape[1:]
        (det,) = detections_to_host(model([image]))  # the model resizes, and maps back
        # In the file's pixels, one mask at a time: D full-size masks of a large photo at once
        # would take D·H·W bytes (about 5 GB for 100 detections on 8000×6000).
        boxes = to_file_pixels({k: v for k, v in det.items() if k != "masks"}, scale, file_size)
        for i, r in enumerate(to_results(image_id, boxes, meta["category_ids"])):
            if "masks" in det:  # a keypoint model may have no mask head
                full = to_file_pixels({"boxes": boxes["boxes"][:1], "masks": det["masks"][i, None]},
                                      scale, file_size)["masks"]  # fmt: skip
                r["segmentation"] = encode_masks(full)[0]
            results.append({**r, "file_name": os.path.basename(path)})
        fig = new_figure((6, 6 * height / width))
        ax = fig.add_subplot()
        kept = int((det["scores"] >= score_thresh).sum())
        draw_detections(ax, image, det, meta["classes"], score_thresh,
                        title=f"{os.path.basename(path)}: {kept} detections",
                        skeleton=skeleton_of(meta, model))  # fmt: skip
        target = os.path.join(out_dir, name + "_pred.png")
        os.makedirs(out_dir, exist_ok=True)  # with the first drawing: none when no file reads
        fig.tight_layout()
        fig.savefig(target, dpi=110)
        written.append(target)
    if not written:
        raise ValueError(f"none of the {len(skipped)} image files could be read: "
                         + "; ".join(skipped))  # fmt: skip
    results_path = os.path.join(out_dir, "detections.json")
    write_results_json(results_path, results)
    return [*written, results_path], skipped
