"""``python -m minimask.bench ablations``: the paper's ablations (Table 2, Table 6), in direction.

Each study trains the ``tiny`` or ``tiny_c4`` model on synthetic shapes (``tiny_keypoints`` on
stick figures for Table 6) under two settings of one config switch, with the same budget and the
same seeds, and prints mask AP / AP50 / AP75 (OKS AP for keypoints) as the mean over seeds ± half
their range, beside the paper's COCO figures (He et al. 2017, ResNet-50):

===========================================  ==============================  =====================
study                                        settings (ours)                 paper
===========================================  ==============================  =====================
RoIPool vs RoIAlign, C4 (Table 2c)           ``pooler``                      26.9 vs 30.3 AP
softmax vs sigmoid mask loss, C4 (Table 2b)  ``mask_loss``                   24.8 vs 30.3 AP
class-agnostic vs class-specific, C4 (§4.2)  ``mask_class_agnostic``         29.7 vs 30.3 AP
RoIPool vs RoIAlign, C5 stride 32 (2d)       ``layout="c5"``, ``pooler``     23.6 vs 30.9 AP
MLP vs FCN mask head, FPN (Table 2e)         ``mask_head``                   31.5 vs 33.6 AP
C4 vs FPN (Table 2a)                         ``tiny_c4`` vs ``tiny``         30.3 vs 33.6 AP
keypoints, RoIPool vs RoIAlign (Table 6)     ``pooler``, stick figures       59.8 vs 64.2 AP_kp
===========================================  ==============================  =====================

The shapes here are small (12 to 32 pixels on 128-pixel images, up to five per image): RoIPool's
rounding costs most where a cell of the feature map is a large part of the object, and AP75
shows it more than AP50. Numbers are not comparable with the paper's in size (a different data
set, a model thousands of times smaller, minutes of training); only the directions are.

Every finished run is stored in ``OUT/results.json`` at once (written atomically), so an
interrupted study resumes where it stopped and a finished one prints again without training.
``--jobs 2`` trains two runs at a time, one BLAS thread each: on two cores that is the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# Small objects: where quantisation costs most (module docstring).
SHAPES = {"min_size": 12, "max_size": 32, "min_shapes": 2, "max_shapes": 5, "min_visible": 0.5}
SMALL_ANCHORS = (12, 24, 48)  # one level, for the C4 and C5 layouts at these object sizes
# Fewer sampled RoIs per image than the presets' 64, for every setting alike: C4's res5 box head
# runs on each, and this keeps a study of 3 seeds × 2 settings within minutes per run.
COMMON = {"box_batch_per_image": 32}
METRICS = ("AP", "AP50", "AP75")


@dataclass(frozen=True)
class Setting:
    """One trained model: a preset with some config fields changed, and the paper's figures."""

    label: str  # the setting's name in the table, e.g. "RoIAlign"
    preset: str
    changes: dict = field(default_factory=dict)
    paper: tuple = ()  # the paper's (AP, AP50, AP75), None where it gives no figure
    task: str = "shapes"  # "shapes" (mask AP) or "figures" (stick figures, keypoint OKS AP)

    @property
    def metric(self) -> str:
        """The COCO IoU type the study compares: ``segm`` (masks) or ``keypoints`` (OKS)."""
        return "keypoints" if self.task == "figures" else "segm"

    @property
    def key(self) -> str:
        """A name for the stored results: the preset and its changes."""
        changes = ",".join(f"{k}={v}" for k, v in sorted(self.changes.items()))
        return f"{self.preset}[{changes}]" + ("" if self.task == "shapes" else f"@{self.task}")


C4 = {"anchor_sizes": SMALL_ANCHORS}
C5 = {"layout": "c5", "anchor_sizes": SMALL_ANCHORS}

# (study, where the paper reports it, [the setting the paper finds worse, the better one])
STUDIES = [
    ("RoIPool vs RoIAlign, C4 (stride 16)", "Table 2c", [
        Setting("RoIPool", "tiny_c4", {**C4, "pooler": "roi_pool"}, (26.9, 48.8, 26.4)),
        Setting("RoIAlign", "tiny_c4", C4, (30.3, 51.2, 31.5)),
    ]),
    ("softmax vs sigmoid mask loss, C4", "Table 2b", [
        Setting("softmax", "tiny_c4", {**C4, "mask_loss": "softmax"}, (24.8, 44.1, 25.1)),
        Setting("sigmoid", "tiny_c4", C4, (30.3, 51.2, 31.5)),
    ]),
    ("class-agnostic vs class-specific masks, C4", "§4.2", [
        Setting("agnostic", "tiny_c4", {**C4, "mask_class_agnostic": True}, (29.7, None, None)),
        Setting("specific", "tiny_c4", C4, (30.3, 51.2, 31.5)),
    ]),
    ("RoIPool vs RoIAlign, C5 (stride 32)", "Table 2d", [
        Setting("RoIPool", "tiny", {**C5, "pooler": "roi_pool"}, (23.6, 46.5, 21.6)),
        Setting("RoIAlign", "tiny", C5, (30.9, 51.8, 32.1)),
    ]),
    ("MLP vs FCN mask head, FPN", "Table 2e", [
        Setting("MLP", "tiny", {"mask_head": "mlp"}, (31.5, 53.7, 32.8)),
        Setting("FCN", "tiny", {}, (33.6, 55.2, 35.3)),
    ]),
    ("C4 vs FPN", "Table 2a", [
        Setting("C4", "tiny_c4", C4, (30.3, 51.2, 31.5)),
        Setting("FPN", "tiny", {}, (33.6, 55.2, 35.3)),
    ]),
    ("keypoints: RoIPool vs RoIAlign, FPN (OKS AP)", "Table 6", [
        Setting("RoIPool", "tiny_keypoints", {"pooler": "roi_pool"}, (59.8, 86.2, 66.7),
                task="figures"),
        Setting("RoIAlign", "tiny_keypoints", {}, (64.2, 86.6, 69.7), task="figures"),
    ]),
]  # fmt: skip


def train_and_evaluate(setting: Setting, seed: int, iterations: int, batch_size: int,
                       val_images: int, out_dir: str) -> dict:  # fmt: skip
    """Train one setting from scratch with ``seed`` and return its metrics (AP, AP50, AP75 of
    each IoU type the model is evaluated on: bbox and segm, or bbox and keypoints)."""
    from minimask import workflow  # noqa: PLC0415
    from minimask.data.shapes import ShapesConfig  # noqa: PLC0415
    from minimask.train import TrainConfig  # noqa: PLC0415

    quiet = lambda *args, **kwargs: None  # noqa: E731
    if setting.task == "figures":
        data = workflow.FiguresData(val_images, val_seed=1000)
    else:
        data = workflow.ShapesData(val_images, val_seed=1000, shapes=ShapesConfig(**SHAPES))
    config = TrainConfig(iterations=iterations, lr=0.02, warmup_iters=min(100, iterations // 4),
                         milestones=(int(iterations * 0.8),), checkpoint_every=iterations,
                         seed=seed)  # fmt: skip
    start = time.perf_counter()
    model = workflow.train(data, setting.preset, config, batch_size, out_dir, progress=False,
                           log=quiet, overwrite=True,
                           config_changes={**COMMON, **setting.changes})  # fmt: skip
    seconds = time.perf_counter() - start
    meta = {**data.meta(), "preset": setting.preset}
    metrics = workflow.evaluate(model, meta, data, out_dir, progress=False, log=quiet)
    record = {kind: {k: m[k] for k in METRICS} for kind, m in metrics.items()}
    return {**record, "train_seconds": seconds}


def _job(args):
    """One run in a worker process, with one BLAS thread (``--jobs`` of them share the cores)."""
    setting, seed, iterations, batch_size, val_images, out_dir, threads = args
    from minimask.backend import set_threads  # noqa: PLC0415

    if threads:  # else the policy the parent process chose (--threads)
        set_threads(threads)
    return setting.key, seed, train_and_evaluate(setting, seed, iterations, batch_size,
                                                 val_images, out_dir)  # fmt: skip


def _write_json(path: str, record: dict) -> None:
    """Write atomically: a study stopped mid-write keeps its earlier results."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def _fmt(values) -> str:
    """Mean ± half the range, in AP points (×100), or n/a."""
    values = [v for v in values if v is not None and v >= 0]
    if not values:
        return "n/a"
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {(v.max() - v.min()) / 2:.1f}"


def table(results: dict, seeds, studies=STUDIES) -> str:
    """The Markdown table of ``studies``: ours (mean ± half-range over seeds) beside the paper.

    The last column of each study's second row gives our gain of the paper's better setting
    over its worse one, in AP points, and whether its sign is the paper's.
    """
    rows = ["| study | setting | AP | AP50 | AP75 | paper AP | AP50 | AP75 | our gain |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for study, where, settings in studies:
        means = []
        for s in settings:
            runs = [results.get(s.key, {}).get(str(seed)) for seed in seeds]
            runs = [r for r in runs if r]
            cells = [_fmt([r[s.metric][m] for r in runs]) for m in METRICS]
            means.append([100 * np.mean([r[s.metric][m] for r in runs]) if runs else None
                          for m in METRICS])  # fmt: skip
            paper = ["–" if p is None else f"{p}" for p in (*s.paper, None, None, None)[:3]]
            rows.append(f"| {study} ({where}) | {s.label} ({len(runs)} seeds) | "
                        + " | ".join(cells + paper) + " |")  # fmt: skip
        worse, better = means
        gain = ""
        if None not in worse + better:
            d = [b - w for w, b in zip(worse, better)]
            sign = "as the paper" if d[0] > 0 else "opposite to the paper" if d[0] < 0 else "tie"
            gain = f"AP {d[0]:+.1f}, AP50 {d[1]:+.1f}, AP75 {d[2]:+.1f}: {sign}"
        rows[-2] += " |"
        rows[-1] += f" {gain} |"
    return "\n".join(rows)


def main(repeat: int = 3, argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench ablations",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--iterations", type=int, default=250, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the runs (default: 0 .. --repeat - 1)")  # fmt: skip
    parser.add_argument("--val-images", type=int, default=50, help="validation images per run")
    parser.add_argument(
        "--studies",
        nargs="+",
        default=None,
        metavar="N",
        help="only these studies (numbers from 1, in the table's order)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--out", default="runs/ablations", help="results.json and run folders")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else list(range(repeat))
    chosen = [STUDIES[int(n) - 1] for n in args.studies] if args.studies else STUDIES
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    record = {"iterations": args.iterations, "batch_size": args.batch_size, "shapes": SHAPES,
              "val_images": args.val_images, "results": {}}  # fmt: skip
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        same = all(stored.get(k) == record[k] for k in ("iterations", "batch_size", "val_images"))
        if same:
            record = stored
        else:
            print(f"{path} holds runs of other settings; starting afresh")
    results = record["results"]
    todo, seen = [], set()
    for _, _, settings in chosen:
        for s in settings:
            for seed in seeds:
                if str(seed) in results.get(s.key, {}) or (s.key, seed) in seen:
                    continue
                seen.add((s.key, seed))
                folder = os.path.join(args.out, f"{s.key}-seed{seed}".replace("=", "-"))
                threads = 1 if args.jobs > 1 else 0
                todo.append((s, seed, args.iterations, args.batch_size, args.val_images, folder,
                             threads))  # fmt: skip
    print(
        f"## Ablations on small shapes: {len(seeds)} seeds, {args.iterations} iterations of "
        f"batch {args.batch_size}; {len(todo)} runs to train, {args.jobs} at a time\n"
    )
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for done, (key, seed, metrics) in enumerate(pool.map(_job, todo), 1):
            results.setdefault(key, {})[str(seed)] = metrics
            _write_json(path, record)
            elapsed = time.perf_counter() - start
            kind = "keypoints" if "keypoints" in metrics else "segm"
            print(f"  [{done}/{len(todo)}] {key} seed {seed}: {kind} AP "
                  f"{metrics[kind]['AP']:.3f}, AP75 {metrics[kind]['AP75']:.3f} "
                  f"({elapsed:.0f} s)", flush=True)  # fmt: skip
    print()
    print(table(results, seeds, chosen))


if __name__ == "__main__":
    main()
