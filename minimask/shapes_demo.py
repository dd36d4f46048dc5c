"""Training, evaluating and predicting with Mask R-CNN on the synthetic shapes, end to end.

``minimask demo`` calls :func:`run_demo`: train the ``tiny`` preset on the shapes stream on the
CPU, evaluate COCO-style on the fixed validation split, and write

- ``loss_curve.png`` and ``losses.jsonl`` (from :func:`minimask.train.fit`),
- ``predictions.png``: ground truth and predictions side by side,
- ``metrics.json``: bbox and segm AP, AP50, AP75 and the run's facts,
- ``checkpoint.npz``: the trained model (``minimask predict --checkpoint`` reads it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from minimask.data.shapes import CLASSES, ShapesConfig, ShapesDataset, make_sample
from minimask.evaluate import evaluate, format_stat
from minimask.model.config import MaskRCNNConfig, get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.train import TrainConfig, fit, load_checkpoint
from minimask.visualize import save_predictions_figure


@dataclass(frozen=True)
class DemoConfig:
    iterations: int = 1200  # optimizer steps (about 6 minutes on 2 idle cores)
    batch_size: int = 4  # images per step
    lr: float = 0.02  # SGD learning rate after warm-up
    warmup_iters: int = 100  # linear warm-up
    val_images: int = 100  # size of the fixed validation split
    seed: int = 0  # seeds the weights, the data stream and the samplers


def shapes_batches(seed: int, batch_size: int, shapes: ShapesConfig | None = None):
    """``i -> (images, targets)`` for the training stream: images ``i·B .. i·B + B - 1``."""
    shapes = shapes or ShapesConfig()

    def get_batch(i: int):
        samples = [make_sample(seed, i * batch_size + k, shapes) for k in range(batch_size)]
        return [s["image"] for s in samples], samples

    return get_batch


def build_model(preset: str, seed: int, **changes) -> MaskRCNN:
    """A freshly initialised model of ``preset`` (weights drawn from ``seed``)."""
    init.manual_seed(seed)
    return MaskRCNN(get_config(preset, **changes))


def model_from_checkpoint(path: str) -> tuple[MaskRCNN, dict]:
    """Rebuild the model a checkpoint was trained as, and load its weights."""
    import numpy as np  # noqa: PLC0415

    with np.load(path, allow_pickle=False) as archive:
        if "meta" not in archive.files:
            raise ValueError(f"{path} is not a minimask training checkpoint (no 'meta' entry)")
        meta = json.loads(str(archive["meta"]))
    if "model_config" not in meta:
        raise ValueError(f"{path} holds no model_config: not a Mask R-CNN checkpoint")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()}
    model = MaskRCNN(MaskRCNNConfig(**fields))
    load_checkpoint(path, model)
    model.eval()
    return model, meta


def train_shapes(preset: str, train: TrainConfig, batch_size: int, out_dir: str,
                 resume: bool = False, progress: bool = True) -> MaskRCNN:  # fmt: skip
    """Train ``preset`` on the shapes stream (see :func:`minimask.train.fit`)."""
    model = build_model(preset, train.seed, num_classes=len(CLASSES))
    meta = {
        "preset": preset,
        "dataset": "shapes",
        "classes": list(CLASSES),
        "batch_size": batch_size,
        "model_config": asdict(model.config),
    }
    fit(model, shapes_batches(train.seed, batch_size), train, out_dir, resume, progress, meta)
    return model


def evaluate_shapes(model, out_dir: str, val_images: int, seed: int, progress: bool = True):
    """COCO metrics on the shapes validation split; writes predictions.png; returns metrics."""
    samples = list(ShapesDataset(val_images, seed=seed))
    metrics, detections = evaluate(model, samples, CLASSES, progress=progress)
    save_predictions_figure(
        os.path.join(out_dir, "predictions.png"), samples[:8], detections[:8], CLASSES
    )
    return metrics


def summary_table(metrics: dict) -> str:
    rows = ["| task | AP | AP50 | AP75 |", "|---|---:|---:|---:|"]
    for task in ("bbox", "segm"):
        m = metrics[task]
        ap, ap50, ap75 = (format_stat(m[n]) for n in ("AP", "AP50", "AP75"))
        rows.append(f"| {task} | {ap} | {ap50} | {ap75} |")
    return "\n".join(rows)


def run_demo(config: DemoConfig = DemoConfig(), out_dir: str = "runs/demo",
             progress: bool = True, log=print) -> dict:  # fmt: skip
    """Train, evaluate, draw and report (the README's main command)."""
    train = TrainConfig(
        iterations=config.iterations,
        lr=config.lr,
        warmup_iters=config.warmup_iters,
        milestones=(int(config.iterations * 0.8),),
        checkpoint_every=max(config.iterations // 5, 1),
        seed=config.seed,
    )
    log(f"minimask demo: Mask R-CNN (tiny preset) on synthetic shapes, {config.iterations} "
        f"iterations of {config.batch_size} images, CPU; writing to {out_dir}/")  # fmt: skip
    start = time.perf_counter()
    model = train_shapes("tiny", train, config.batch_size, out_dir, progress=progress)
    train_seconds = time.perf_counter() - start
    metrics = evaluate_shapes(model, out_dir, config.val_images, config.seed, progress)
    result = {
        "demo": asdict(config),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(train_seconds / max(config.iterations, 1), 3),
        **metrics,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(f"\ntrained in {train_seconds:.0f} s ({result['seconds_per_iteration']} s/iteration); "
        f"validation on {config.val_images} images:\n\n{summary_table(metrics)}\n")  # fmt: skip
    log(f"wrote {out_dir}/loss_curve.png, {out_dir}/predictions.png, {out_dir}/metrics.json "
        f"and {out_dir}/checkpoint.npz")  # fmt: skip
    return result
