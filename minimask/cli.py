"""The ``minimask`` command line: ``minimask <command> [options]`` (or ``python -m minimask``).

Commands:
    demo             train the tiny Mask R-CNN on synthetic shapes, evaluate it, draw it
    train            train a Mask R-CNN preset (checkpoints, loss log and curve, --resume)
    eval             COCO-style bbox and segm AP of a checkpoint (shapes, or a COCO split)
    predict          detect in image files: drawings and COCO results JSON
    export           write a checkpoint in torchvision's names (.pth, .safetensors)
    data subset      write a smaller COCO dataset in the official layout
    classifier-demo  the foundation's tiny CNN classifier on synthetic shapes

Each command is a pair of plain functions, ``_add_<name>(subparsers)`` to declare its options and
``_run_<name>(args) -> exit code`` to do the work; a new command adds its pair and one line to
:func:`build_parser`. Every dataset goes through one train/eval/predict path
(:mod:`minimask.workflow`).
"""

from __future__ import annotations

import argparse
import contextlib


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
    p.add_argument("--min-size", type=int, default=None,
                   help="shorter image side the model resizes to (default: the preset's; "
                   "coco: 320)")  # fmt: skip
    p.add_argument("--max-size", type=int, default=None,
                   help="longer side at most (default: the preset's; coco: 533)")  # fmt: skip
    p.add_argument(
        "--keep-empty",
        action="store_true",
        help="coco: also train on images with no annotation (background only)",
    )
    p.add_argument("--no-flip", action="store_true", help="coco: no random horizontal flip")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="start from a whole Mask R-CNN's weights (torchvision's .pth or "
                   ".safetensors, or a minimask checkpoint)")  # fmt: skip
    p.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="start the backbone from an ImageNet ResNet (torchvision's resnet50 "
                   ".pth)")  # fmt: skip
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
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an OUT that already holds a run")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_train)


def _data(args):
    """The data adapter the arguments name (shapes, or a COCO-format root and split)."""
    from minimask import workflow  # noqa: PLC0415

    if args.dataset == "coco":
        _need_root(args)
        return workflow.CocoData(args.root, args.split, getattr(args, "categories", None),
                                 keep_empty=getattr(args, "keep_empty", False),
                                 flip=not getattr(args, "no_flip", False))  # fmt: skip
    return workflow.ShapesData(getattr(args, "val_images", 100), getattr(args, "seed", 0))


def _run_train(args) -> int:
    from minimask import workflow  # noqa: PLC0415
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
    with _clear_errors(args):
        workflow.train(_data(args), args.preset, config, args.batch_size, args.out,
                       resume=args.resume, weights=args.weights,
                       backbone_weights=args.backbone_weights, min_size=args.min_size,
                       max_size=args.max_size, progress=not args.no_progress,
                       overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {args.out}/checkpoint.npz, {args.out}/losses.jsonl, {args.out}/loss_curve.png")
    return 0


@contextlib.contextmanager
def _clear_errors(args):
    """Bad input (a missing file, a corrupt checkpoint or weights file, a bad annotation file)
    ends the command with one line naming it, not a traceback."""
    from minimask.data.coco import CocoFormatError  # noqa: PLC0415
    from minimask.data.images import BadImageError  # noqa: PLC0415
    from minimask.model.torch_format import WeightsError  # noqa: PLC0415

    try:
        yield
    except (CocoFormatError, WeightsError, BadImageError, FileNotFoundError) as e:
        raise SystemExit(f"minimask {args.command}: {e}") from e
    except (KeyError, ValueError) as e:  # a checkpoint or weights file that does not fit
        message = e.args[0] if e.args else repr(e)
        raise SystemExit(f"minimask {args.command}: {message}") from e


# ---------------------------------------------------------------------------- eval
def _add_model_options(p) -> None:
    p.add_argument("--checkpoint", default=None, help="a minimask checkpoint.npz")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="or any Mask R-CNN's weights (torchvision's .pth, .safetensors); "
                   "torchvision's 91-class COCO labels are COCO category ids")  # fmt: skip
    p.add_argument("--preset", default="r50_fpn", choices=("tiny", "r50_fpn"),
                   help="with --weights: the architecture (default r50_fpn at 800/1333 px)")


def _load_model(args):
    from minimask.model.checkpoint import load_model  # noqa: PLC0415

    if bool(args.checkpoint) == bool(args.weights):
        raise SystemExit(f"minimask {args.command}: give --checkpoint FILE or --weights FILE")
    return load_model(args.checkpoint, args.weights, args.preset)


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="COCO-style AP of a checkpoint on a dataset")
    _add_model_options(p)
    p.add_argument("--dataset", default="shapes", choices=("shapes", "coco"))
    _add_coco_options(p, split="val2017")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--val-images", type=int, default=100, help="shapes: validation images")
    p.add_argument("--seed", type=int, default=0, help="shapes: seed of the validation split")
    p.add_argument("--out", default=None,
                   help="folder for metrics, results and plots (default: beside the "
                   "checkpoint, or runs/eval)")  # fmt: skip
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
    import os  # noqa: PLC0415

    from minimask import workflow  # noqa: PLC0415

    with _clear_errors(args):
        model, meta = _load_model(args)
        data = _data(args)
        if args.checkpoint and meta.get("dataset") not in (None, args.dataset):
            raise SystemExit(f"minimask eval: {args.checkpoint} was trained on "
                             f"{meta.get('dataset')!r}, not {args.dataset!r}")  # fmt: skip
        if args.checkpoint:
            out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        else:
            out = args.out or "runs/eval"
        metrics = workflow.evaluate(model, meta, data, out, args.max_images, args.batch_size,
                                    progress=not args.no_progress)  # fmt: skip
    print(workflow.summary_table(metrics))
    names = ("metrics.json", "pr_curves.png", "predictions.png")
    written = [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))]
    print("wrote " + ", ".join(written))
    return 0


# ---------------------------------------------------------------------------- predict
def _add_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect in image files: drawn PNGs and COCO results JSON",
        description="Run a checkpoint (or any Mask R-CNN's weights) on image files. Writes "
        "<name>_pred.png per image and detections.json with every detection as a COCO result.",
    )
    _add_model_options(p)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG...)")
    p.add_argument("--out", default="runs/predict", help="folder for the drawings and JSON")
    p.add_argument("--score-thresh", type=float, default=0.5, help="drawing threshold")
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from minimask import workflow  # noqa: PLC0415

    with _clear_errors(args):
        model, meta = _load_model(args)
        for path in workflow.predict_files(model, meta, args.images, args.out,
                                           args.score_thresh):  # fmt: skip
            print(path)
    return 0


# ---------------------------------------------------------------------------- export
def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint in torchvision's names (.pth or .safetensors)",
        description="Write a minimask checkpoint's model with torchvision's key layout: "
        "model.pth (read by torch.load(weights_only=True), written without torch) or "
        "model.safetensors. torchvision's maskrcnn_resnet50_fpn loads it with strict=True.",
    )
    p.add_argument("--checkpoint", required=True, help="a minimask checkpoint.npz")
    p.add_argument("--to", required=True, metavar="FILE", help="model.pth or model.safetensors")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from minimask.model.checkpoint import model_from_checkpoint  # noqa: PLC0415
    from minimask.model.weights import export_weights  # noqa: PLC0415

    with _clear_errors(args):
        model, _ = model_from_checkpoint(args.checkpoint)
        export_weights(model, args.to)
    print(f"wrote {args.to}")
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
    with _clear_errors(args):
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
    _add_export(subparsers)
    _add_classifier_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
