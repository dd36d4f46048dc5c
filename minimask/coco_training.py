"""Training and evaluating Mask R-CNN on a COCO-format dataset (``--dataset coco``).

``minimask train --dataset coco --root ROOT`` calls :func:`train_coco`: read
``ROOT/annotations/instances_<split>.json``, build the preset with ``num_classes`` from the chosen
categories, and run :func:`minimask.train.fit` on a deterministic stream of resized, randomly
flipped batches (:class:`CocoBatches`). ``minimask eval --dataset coco`` calls
:func:`evaluate_coco`: predict every image at the training scale, map the detections back to
the stored image size, write them as a COCO results JSON (real COCO category ids, masks as RLE),
and run COCOeval against the JSON's own ground truth (crowd regions included, as COCO does).

A bad image (missing, unreadable, wrong size) is a counted skip: the batch takes the next image
of the epoch instead, and the summary is printed at the end of the run (see ``docs/coco.md``).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from minimask.data.coco import BadImageError, CocoDataset, DataProblems
from minimask.data.transforms import detections_to_original, random_horizontal_flip, resize
from minimask.engine import no_grad
from minimask.evaluate import (
    STAT_NAMES,
    coco_evaluate,
    detections_to_results,
    format_stat,
    save_pr_curves,
    write_results_json,
)
from minimask.model.config import MaskRCNNConfig, get_config
from minimask.model.mask_rcnn import MaskRCNN, detections_to_host
from minimask.nn import init
from minimask.train import TrainConfig, fit

MIN_SIZE, MAX_SIZE = 320, 533  # CPU scale: 800/1333 of the paper times 0.4


def coco_model_config(preset: str, num_classes: int, min_size: int = MIN_SIZE,
                      max_size: int = MAX_SIZE) -> MaskRCNNConfig:  # fmt: skip
    """``preset`` sized for COCO photos at ``min_size`` and ``num_classes`` (background included).

    For ``tiny`` (built for 128-pixel shapes) the anchors grow to 16..256 pixels, the inputs are
    normalised with the ImageNet mean/std, and 100 detections are kept (COCO's AR@100). For
    ``r50_fpn``, which minimask trains from scratch (no ImageNet weights), frozen BatchNorm
    becomes GroupNorm and every stage trains, as in He et al., "Rethinking ImageNet
    Pre-training" (2019), the recipe that trains Mask R-CNN R50-FPN from random weights.
    """
    changes = {"num_classes": num_classes, "min_size": min_size, "max_size": max_size}
    if preset == "r50_fpn":
        changes.update(norm="group_norm", trainable_stages=5)
    if preset == "tiny":
        photo = MaskRCNNConfig()
        changes.update(anchor_sizes=(16, 32, 64, 128, 256), image_mean=photo.image_mean,
                       image_std=photo.image_std, detections_per_image=100)  # fmt: skip
    return get_config(preset, **changes)


class CocoBatches:
    """``i -> (images, targets)`` for :func:`minimask.train.fit`, deterministic in ``i``.

    Batch ``i`` holds stream positions ``p = i·B .. i·B + B - 1``; position ``p`` is image
    ``perm_e[p mod N]`` of epoch ``e = p // N`` (``perm_e`` drawn from ``(seed, e)``), resized,
    and flipped when a coin drawn from ``(seed, p)`` says so. A bad image is replaced by the
    next one of the same epoch, remembered, and counted in :attr:`problems`.

    While step ``i`` runs, one background thread already loads batch ``i + 1`` (Pillow and
    pycocotools decode outside the GIL), so on a GPU the loading hides behind the step.
    """

    def __init__(self, dataset: CocoDataset, batch_size: int, min_size: int, max_size: int,
                 seed: int = 0, flip: bool = True):  # fmt: skip
        if len(dataset) == 0:
            raise ValueError(f"{dataset.annotation_file}: no image with annotations to train on")
        self.dataset, self.batch_size, self.seed, self.flip = dataset, batch_size, seed, flip
        self.min_size, self.max_size = min_size, max_size
        self.problems = DataProblems(f"images of {dataset.image_dir}")
        self.bad: set[int] = set()
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
        self._worker = ThreadPoolExecutor(max_workers=1)  # all loading runs on this one thread
        self._next: tuple[int, Future | None] = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
            self._perm = (epoch, order)
        return self._perm[1]

    def sample(self, position: int) -> dict:
        """The transformed sample at stream ``position`` (skipping bad images)."""
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        perm = self.permutation(epoch)
        for step in range(n):
            index = int(perm[(offset + step) % n])
            if index in self.bad:
                continue
            try:
                sample = self.dataset[index]
            except BadImageError as e:
                self.bad.add(index)
                self.problems.add("bad image skipped", str(e))
                continue
            sample = resize(sample, self.min_size, self.max_size)
            if self.flip:
                coin = np.random.default_rng((self.seed, 1, position))
                sample = random_horizontal_flip(sample, coin)
            return sample
        raise RuntimeError(
            f"no readable image in {self.dataset.image_dir}:\n{self.problems.summary()}"
        )

    def load(self, i: int):
        """Batch ``i`` as ``(images, targets)``, loaded on the calling thread."""
        samples = [self.sample(i * self.batch_size + k) for k in range(self.batch_size)]
        return [s["image"] for s in samples], samples

    def __call__(self, i: int):
        index, future = self._next
        if index != i or future is None:
            future = self._worker.submit(self.load, i)
        self._next = (i + 1, self._worker.submit(self.load, i + 1))  # overlaps step i
        return future.result()


def train_coco(root: str, split: str, preset: str, train: TrainConfig, batch_size: int,
               out_dir: str, categories=None, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE,
               keep_empty: bool = False, flip: bool = True, resume: bool = False,
               progress: bool = True, log=print) -> MaskRCNN:  # fmt: skip
    """Train ``preset`` on ``ROOT/<split>`` (see the module docstring); returns the model."""
    dataset = CocoDataset.from_root(root, split, categories=categories, keep_empty=keep_empty)
    init.manual_seed(train.seed)
    model = MaskRCNN(coco_model_config(preset, dataset.num_classes, min_size, max_size))
    meta = {
        "preset": preset,
        "dataset": "coco",
        "root": os.path.abspath(root),
        "split": split,
        "classes": dataset.classes,
        "category_ids": dataset.category_ids.tolist(),
        "batch_size": batch_size,
        "model_config": asdict(model.config),
    }
    log(f"training {preset} on {len(dataset)} images of {split} "
        f"({dataset.num_classes - 1} categories) at shorter side {min_size} "
        f"(longer <= {max_size}), batch {batch_size}")  # fmt: skip
    batches = CocoBatches(dataset, batch_size, min_size, max_size, train.seed, flip)
    start = time.perf_counter()
    fit(model, batches, train, out_dir, resume, progress, meta)
    seconds = time.perf_counter() - start
    log(f"trained in {seconds:.0f} s ({seconds / max(train.iterations, 1):.2f} s/iteration)")
    if batches.problems:
        log(batches.problems.summary())
    return model


@no_grad()
def predict_coco(model: MaskRCNN, dataset: CocoDataset, indices, batch_size: int = 2,
                 progress: bool = True, keep: int = 0):  # fmt: skip
    """Detections on the stored image sizes, as COCO results, for ``dataset[indices]``.

    Returns ``(results, image_ids, problems, shown)``: the results list (real COCO category
    ids), the ids of the images read, the bad images skipped, and the first ``keep`` (sample,
    detection) pairs for drawing.
    """
    model.eval()
    c = model.config
    problems = DataProblems(f"images of {dataset.image_dir}")
    results, image_ids, shown = [], [], []
    chunks = [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        chunks = tqdm(chunks, desc="predict", dynamic_ncols=True)
    for chunk in chunks:
        samples = []
        for index in chunk:
            try:
                samples.append(dataset[index])
            except BadImageError as e:
                problems.add("bad image skipped", str(e))
        if not samples:
            continue
        resized = [resize(s, c.min_size, c.max_size) for s in samples]
        detections = detections_to_host(model([r["image"] for r in resized]))
        for s, r, det in zip(samples, resized, detections):
            det = detections_to_original(det, r["image"].shape[1:], s["orig_size"])
            coco_ids = dataset.category_ids[det["labels"] - 1]  # labels 1..K -> COCO ids
            results += detections_to_results(s["image_id"], {**det, "labels": coco_ids})
            image_ids.append(s["image_id"])
            if len(shown) < keep:
                shown.append((s, det))
    return results, image_ids, problems, shown


def evaluate_coco(model: MaskRCNN, meta: dict, root: str, split: str, out_dir: str,
                  max_images: int | None = None, batch_size: int = 2, progress: bool = True,
                  log=print) -> dict:  # fmt: skip
    """COCO bbox and segm metrics of ``model`` on ``ROOT/<split>``; writes to ``out_dir``:

    ``results_<split>.json`` (COCO results), ``metrics.json``, ``pr_curves.png`` (precision /
    recall at IoU 0.5 and 0.75) and ``predictions.png`` (a few images).
    """
    from minimask.visualize import save_predictions_figure  # noqa: PLC0415

    dataset = CocoDataset.from_root(root, split, categories=meta.get("category_ids"),
                                    keep_empty=True)  # fmt: skip
    if meta.get("classes") and list(meta["classes"]) != dataset.classes:
        raise ValueError(f"the checkpoint's classes {meta['classes'][1:4]}... differ from "
                         f"{dataset.annotation_file}'s {dataset.classes[1:4]}...")  # fmt: skip
    indices = list(range(len(dataset) if max_images is None else min(max_images, len(dataset))))
    start = time.perf_counter()
    results, image_ids, problems, shown = predict_coco(model, dataset, indices, batch_size,
                                                       progress, keep=4)  # fmt: skip
    seconds = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, f"results_{split}.json")
    write_results_json(results_path, results)
    log(f"{len(results)} detections on {len(image_ids)} images of {split} in {seconds:.0f} s "
        f"-> {results_path}")  # fmt: skip
    evals: dict = {}
    metrics = coco_evaluate(dataset.coco, results, verbose=True, image_ids=image_ids,
                            category_ids=dataset.category_ids, evals=evals)  # fmt: skip
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
                                dataset.classes)  # fmt: skip
    if problems:
        log(problems.summary())
    record = {"split": split, "images": len(image_ids), "skipped": sum(problems.counts.values()),
              "seconds": round(seconds, 1), **metrics}  # fmt: skip
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    return metrics


def summary_lines(metrics: dict) -> str:
    """The 12 COCO numbers of each IoU type as a two-row table."""
    rows = ["| task | " + " | ".join(STAT_NAMES) + " |", "|---" * (len(STAT_NAMES) + 1) + "|"]
    for task, m in metrics.items():
        rows.append(f"| {task} | " + " | ".join(format_stat(m[n]) for n in STAT_NAMES) + " |")
    return "\n".join(rows)


def loading_throughput(dataset: CocoDataset, images: int = 50, min_size: int = MIN_SIZE,
                       max_size: int = MAX_SIZE) -> float:  # fmt: skip
    """Images per second of read + decode masks + resize + flip, on one core (no model)."""
    batches = CocoBatches(dataset, 1, min_size, max_size)
    start = time.perf_counter()
    for p in range(images):
        batches.sample(p)
    return images / (time.perf_counter() - start)
