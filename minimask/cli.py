"""The ``minimask`` command line: ``minimask <command> [options]`` (or ``python -m minimask``).

Commands:
    demo             train the tiny Mask R-CNN on synthetic shapes, evaluate it, draw it
    train            train a Mask R-CNN preset (checkpoints, loss log and curve, --resume)
    eval             COCO-style bbox and segm AP of a checkpoint (shapes, or a COCO split)
    predict          draw a checkpoint's detections on image files
    data subset      write a smaller COCO dataset in the official layout
    classifier-demo  the foundation's tiny CNN classifier on synthetic shapes

Each command is a pair of plain functions, ``_add_<name>(subparsers)`` to declare its options and
``_run_<name>(args) -> exit code`` to do the work; a new command (``train``, ``eval``, ``predict``,
``data``) adds its pair and one line to :func:`build_parser`.
"""

from __future__ import annotations

import argparse


# ---------------------------------------------------------------------------- classifier-demo
def _add_classifier_demo(subparsers) -> None:
    from minimask.classifier_demo import DemoConfig  # noqa: PLC0415 - keep --help fast

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "classifier-demo",
        help="train a tiny CNN on synthetic shapes (CPU, about a minute)",
        description="Train a tiny CNN classifier built from minimask.nn on synthetic shapes, "
        "then print its held-out accuracy and write loss_curve.png and metrics.json.",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="training iterations")
    p.add_argument("--out", default="runs/classifier", help="folder for plot, metrics, weights")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of data and weights")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--device", choices=("cpu", "gpu"), default=defaults.device)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_classifier_demo)


def _run_classifier_demo(args) -> int:
    from minimask.classifier_demo import DemoConfig, run  # noqa: PLC0415

    if args.steps < 1:
        raise SystemExit("minimask classifier-demo: --steps must be at least 1")
    config = DemoConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device
    )
    run(config, out=args.out, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
    from minimask.shapes_demo import DemoConfig  # noqa: PLC0415 - keep --help fast

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train the tiny Mask R-CNN on synthetic shapes and evaluate it (CPU, < 10 min)",
        description="Train the tiny Mask R-CNN preset on synthetic shapes on the CPU, evaluate "
        "bbox and segm AP on a fixed validation split, and write loss_curve.png, "
        "predictions.png, metrics.json and checkpoint.npz.",
    )
    p.add_argument("--iterations", type=int, default=d.iterations, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--val-images", type=int, default=d.val_images, help="validation images")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data, samplers")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from minimask.shapes_demo import DemoConfig, run_demo  # noqa: PLC0415

    _positive(args, "iterations", "batch_size", "val_images")
    config = DemoConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        val_images=args.val_images,
        seed=args.seed,
    )
    run_demo(config, args.out, progress=not args.no_progress)
    return 0


def _positive(args, *names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"minimask {args.command}: --{name.replace('_', '-')} must be >= 1")


# ---------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    from minimask.train import TrainConfig  # noqa: PLC0415

    t = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a Mask R-CNN preset",
        description="Train a Mask R-CNN preset. Writes losses.jsonl, loss_curve.png and an "
        "atomic checkpoint.npz every --checkpoint-every iterations; --resume continues exactly.",
    )
    p.add_argument("--preset", default="tiny", choices=("tiny", "r50_fpn"))
    p.add_argument("--dataset", default="shapes", choices=("shapes", "coco"))
    _add_coco_options(p, split="train2017")
    p.add_argument(
        "--categories",
        default=None,
        help="coco: comma-separated names or ids to train on (default: all)",
    )
    p.add_argument("--min-size", type=int, default=320, help="coco: shorter image side")
    p.add_argument("--max-size", type=int, default=533, help="coco: longer side at most")
    p.add_argument(
        "--keep-empty",
        action="store_true",
        help="coco: also train on images with no annotation (background only)",
    )
    p.add_argument("--no-flip", action="store_true", help="coco: no random horizontal flip")
    p.add_argument("--iterations", type=int, default=t.iterations)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=t.lr, help="base learning rate")
    p.add_argument("--optimizer", default=t.optimizer, choices=("sgd", "adamw"))
    p.add_argument("--warmup", type=int, default=t.warmup_iters, help="warm-up iterations")
    p.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="iterations where lr drops by --gamma (default: at 80%%)")  # fmt: skip
    p.add_argument("--gamma", type=float, default=t.gamma)
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every)
    p.add_argument("--out", default="runs/train", help="checkpoint folder")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from minimask.shapes_demo import train_shapes  # noqa: PLC0415
    from minimask.train import TrainConfig  # noqa: PLC0415

    _positive(args, "iterations", "batch_size", "checkpoint_every")
    milestones = args.milestones if args.milestones is not None else [int(0.8 * args.iterations)]
    config = TrainConfig(
        iterations=args.iterations,
        lr=args.lr,
        optimizer=args.optimizer,
        warmup_iters=args.warmup,
        milestones=tuple(milestones),
        gamma=args.gamma,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    if args.dataset == "coco":
        from minimask.coco_training import train_coco  # noqa: PLC0415
        from minimask.data.coco import CocoFormatError  # noqa: PLC0415

        _need_root(args)
        try:
            train_coco(args.root, args.split, args.preset, config, args.batch_size, args.out,
                       categories=args.categories, min_size=args.min_size,
                       max_size=args.max_size, keep_empty=args.keep_empty,
                       flip=not args.no_flip, resume=args.resume,
                       progress=not args.no_progress)  # fmt: skip
        except CocoFormatError as e:
            raise SystemExit(f"minimask train: {e}") from e
    else:
        train_shapes(args.preset, config, args.batch_size, args.out, args.resume,
                     not args.no_progress)  # fmt: skip
    print(f"wrote {args.out}/checkpoint.npz, {args.out}/losses.jsonl, {args.out}/loss_curve.png")
    return 0


# ---------------------------------------------------------------------------- eval
def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="COCO-style AP of a checkpoint on a dataset")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="shapes", choices=("shapes", "coco"))
    _add_coco_options(p, split="val2017")
    p.add_argument("--max-images", type=int, default=None, help="coco: evaluate the first N")
    p.add_argument("--batch-size", type=int, default=2, help="coco: images per forward pass")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes validation split")
    p.add_argument("--out", default=None, help="folder for metrics.json and predictions.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_eval)


def _add_coco_options(p, split: str) -> None:
    p.add_argument(
        "--root",
        default=None,
        help="coco: folder with annotations/instances_<split>.json and <split>/",
    )
    p.add_argument("--split", default=split, help=f"coco: split name (default {split})")


def _need_root(args) -> None:
    if not args.root:
        raise SystemExit(f"minimask {args.command}: --dataset coco needs --root DIR")


def _run_eval(args) -> int:
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from minimask.shapes_demo import evaluate_shapes, model_from_checkpoint, summary_table  # noqa: PLC0415

    if args.dataset == "coco":
        return _run_eval_coco(args)
    model, _ = model_from_checkpoint(args.checkpoint)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    metrics = evaluate_shapes(model, out, args.val_images, args.seed)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(summary_table(metrics))
    return 0


def _run_eval_coco(args) -> int:
    import os  # noqa: PLC0415

    from minimask.coco_training import evaluate_coco, summary_lines  # noqa: PLC0415
    from minimask.data.coco import CocoFormatError  # noqa: PLC0415
    from minimask.shapes_demo import model_from_checkpoint  # noqa: PLC0415

    _need_root(args)
    model, meta = model_from_checkpoint(args.checkpoint)
    if meta.get("dataset") != "coco":
        raise SystemExit(f"{args.checkpoint} was trained on {meta.get('dataset')!r}, not coco")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    try:
        metrics = evaluate_coco(model, meta, args.root, args.split, out, args.max_images,
                                args.batch_size, progress=not args.no_progress)  # fmt: skip
    except CocoFormatError as e:
        raise SystemExit(f"minimask eval: {e}") from e
    print(summary_lines(metrics))
    names = (f"results_{args.split}.json", "metrics.json", "pr_curves.png", "predictions.png")
    written = [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))]
    print("wrote " + ", ".join(written))
    return 0


# ---------------------------------------------------------------------------- predict
def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="draw a checkpoint's detections on images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG...)")
    p.add_argument("--out", default="runs/predict", help="folder for the drawn images")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from minimask.predict import predict_files  # noqa: PLC0415

    for path in predict_files(args.checkpoint, args.images, args.out, args.score_thresh):
        print(path)
    return 0


# ---------------------------------------------------------------------------- data
def _add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (subset)")
    tools = p.add_subparsers(dest="tool", metavar="tool", required=True)
    s = tools.add_parser(
        "subset",
        help="write a smaller COCO dataset in the official layout",
        description="Keep some categories, images and annotations of a COCO split and write "
        "OUT/annotations/instances_<split>.json plus copies of the images in OUT/<split>/.",
    )
    s.add_argument("--annotations", required=True, help="instances_<split>.json")
    s.add_argument("--images", required=True, help="the folder of the split's images")
    s.add_argument("--categories", default=None, help="comma-separated names or ids")
    s.add_argument("--max-images", type=int, default=None, help="at most this many images")
    s.add_argument("--min-area", type=float, default=0.0,
                   help="drop non-crowd annotations smaller than this (pixels)")  # fmt: skip
    s.add_argument("--split", default=None, help="split name (default: from the JSON's name)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(run=_run_data_subset)


def _run_data_subset(args) -> int:
    from minimask.data.subset import build_subset  # noqa: PLC0415

    if args.max_images is not None and args.max_images < 1:
        raise SystemExit("minimask data subset: --max-images must be >= 1")
    build_subset(args.annotations, args.images, args.out, args.categories, args.max_images,
                 args.min_area, args.split, progress=not args.no_progress)  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimask", description="A from-scratch, teachable Mask R-CNN on NumPy and CuPy."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    _add_demo(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_predict(subparsers)
    _add_data(subparsers)
    _add_classifier_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
