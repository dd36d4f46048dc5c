"""The ``minimask`` command line: ``minimask <command> [options]`` (or ``python -m minimask``).

Commands:
    demo             train the tiny Mask R-CNN on synthetic shapes, evaluate it, draw it
    train            train a Mask R-CNN preset (checkpoints, loss log and curve, --resume)
    eval             COCO-style bbox and segm AP of a checkpoint (shapes, or a COCO split)
    predict          detect in image files: drawings and COCO results JSON
    export           write a checkpoint in torchvision's names (.pth, .safetensors)
    data subset      write a smaller COCO dataset in the official layout
    data import      convert labelme, VIA or mask-folder annotations to the COCO layout
    classifier-demo  the foundation's tiny CNN classifier on synthetic shapes

Each command is a pair of plain functions, ``_add_<name>(subparsers)`` to declare its options and
``_run_<name>(args) -> exit code`` to do the work; a new command adds its pair and one line to
:func:`build_parser`. Every dataset goes through one train/eval/predict path
(:mod:`minimask.workflow`).

Exit status: 0 done; 1 done in part (``predict`` skipped files it could not read, and says how
many); 2 a **user error** stopped the command: bad arguments, a missing or damaged file, a full
disk, a diverged run. A user error is printed as one line on stderr saying what is wrong and
what to do, without a traceback (the one exception, a diverged run, adds the NaN detective's
report). Ctrl-C prints one line and exits with 130. Any other exception is a bug in minimask
and keeps its traceback; ``minimask --debug <command>`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import zipfile
import zlib

DATASETS = ("shapes", "figures", "coco")  # the data adapters of minimask.workflow


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

    _positive(args, "steps", "batch_size")
    _out_folder(args.out)
    config = DemoConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device
    )
    run(config, out=args.out, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
    from minimask.shapes_demo import KEYPOINT_ITERATIONS, DemoConfig  # noqa: PLC0415

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train the tiny Mask R-CNN on synthetic shapes and evaluate it (CPU, < 10 min)",
        description="Train the tiny Mask R-CNN preset on synthetic shapes on the CPU, evaluate "
        "bbox and segm AP on a fixed validation split, and write loss_curve.png, "
        "predictions.png, metrics.json and checkpoint.npz.",
    )
    p.add_argument("--iterations", type=int, default=None,
                   help=f"training steps (default {d.iterations}; --task keypoints: "
                   f"{KEYPOINT_ITERATIONS})")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--val-images", type=int, default=d.val_images, help="validation images")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data, samplers")
    p.add_argument("--task", default=d.task, choices=("shapes", "keypoints"),
                   help="shapes: boxes and masks; keypoints: stick figures' joints")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="output folder")
    _add_device(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from minimask.shapes_demo import KEYPOINT_ITERATIONS, DemoConfig, run_demo  # noqa: PLC0415

    d = DemoConfig()
    _positive(args, "iterations", "batch_size", "val_images")
    device = _device(args)
    _out_folder(args.out)
    if args.iterations is None:
        args.iterations = KEYPOINT_ITERATIONS if args.task == "keypoints" else d.iterations
    config = DemoConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        val_images=args.val_images,
        seed=args.seed,
        device=device,
        task=args.task,
    )
    run_demo(config, args.out, progress=not args.no_progress)
    return 0


def _add_device(p) -> None:
    p.add_argument("--device", default=None, metavar="cpu|gpu",
                   help="where the model runs (default: $MINIMASK_DEVICE, else cpu); gpu needs "
                   "CuPy (pip install -e .[gpu]) and a CUDA device")  # fmt: skip


def _device(args) -> str:
    """The checked device of ``--device`` (refused at once, in one line, when unusable)."""
    from minimask.backend import DeviceError, check_device  # noqa: PLC0415

    try:
        return check_device(args.device)
    except DeviceError as e:
        raise UsageError(f"--device: {e}") from e


def _positive(args, *names) -> None:
    """Refuse options (by their ``args`` names) below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def _out_folder(out: str | None) -> None:
    """Refuse an output folder that is a file (it would fail late, or be taken for a prefix)."""
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")


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
    p.add_argument("--preset", default="tiny", choices=_presets())
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set",
                   help="change one field of the model config (minimask/model/config.py), e.g. "
                   "--set pooler=roi_pool --set mask_loss=softmax; repeat for more")  # fmt: skip
    p.add_argument("--dataset", default="shapes", choices=DATASETS)
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
    p.add_argument("--schedule", default="joint", metavar="joint|alternating",
                   help="joint: every loss at once (approximate joint training, the default); "
                   "alternating: the 4-step alternating training (RPN, detector, RPN on the "
                   "detector's frozen backbone, detector heads), each in OUT/step<k>/")  # fmt: skip
    p.add_argument("--step-iterations", type=int, nargs="+", default=None, metavar="N",
                   help="alternating: the four steps' iterations (default: --iterations split "
                   "in four)")  # fmt: skip
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
                   help="start a new run in an OUT that already holds one (its files are "
                   "replaced)")  # fmt: skip
    _add_device(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_train)


def _presets() -> tuple[str, ...]:
    from minimask.model.config import PRESETS  # noqa: PLC0415

    return tuple(PRESETS)


def _parse_bool(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(f"{text!r} is not true or false")
    return words[text.lower()]


def _parse_field(name: str, text: str, default):
    """``text`` as a value of the config field ``name``, whose default is ``default``: parsed by
    the default's type (bool, int, float, str, or a comma-separated tuple of its element type)."""
    if isinstance(default, tuple):
        kind = type(default[0]) if default else int
        return tuple(_parse_field(name, part.strip(), kind()) for part in text.split(",") if part)
    if isinstance(default, bool):
        return _parse_bool(text)
    return type(default)(text)


def config_changes(settings: list[str]) -> dict:
    """``["pooler=roi_pool", ...]`` (the ``--set`` options) as config changes, parsed by type.

    Raises UsageError (one line) for a malformed setting, an unknown field or a bad value.
    """
    from minimask.model.config import MaskRCNNConfig  # noqa: PLC0415

    defaults = MaskRCNNConfig()
    changes = {}
    for setting in settings:
        name, eq, text = setting.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--set {setting}: write FIELD=VALUE, e.g. --set pooler=roi_pool")
        if name not in MaskRCNNConfig.__dataclass_fields__:
            raise UsageError(f"--set {setting}: unknown config field {name!r}; the fields are "
                             "listed in minimask/model/config.py")  # fmt: skip
        default = getattr(defaults, name)
        try:
            changes[name] = _parse_field(name, text.strip(), default)
        except ValueError as e:
            kind = f"tuple of {type(default[0]).__name__}" if isinstance(default, tuple) else (
                type(default).__name__)  # fmt: skip
            raise UsageError(f"--set {setting}: {name} takes a {kind} ({e})") from None
    return changes


def _data(args):
    """The data adapter the arguments name (shapes, or a COCO-format root and split)."""
    from minimask import workflow  # noqa: PLC0415

    if args.dataset == "coco":
        _need_root(args)
        return workflow.CocoData(args.root, args.split, getattr(args, "categories", None),
                                 keep_empty=getattr(args, "keep_empty", False),
                                 flip=not getattr(args, "no_flip", False),
                                 keypoints=args.keypoints)  # fmt: skip
    if args.dataset == "figures":
        return workflow.FiguresData(getattr(args, "val_images", 100), getattr(args, "seed", 0))
    return workflow.ShapesData(getattr(args, "val_images", 100), getattr(args, "seed", 0))


def _run_train(args) -> int:
    from minimask import workflow  # noqa: PLC0415
    from minimask.train import TrainConfig  # noqa: PLC0415

    _check_train_arguments(args)
    device = _device(args)
    iterations = sum(args.step_iterations) if args.step_iterations else args.iterations
    milestones = args.milestones if args.milestones is not None else [int(0.8 * iterations)]
    config = TrainConfig(
        iterations=iterations,
        lr=args.lr,
        optimizer=args.optimizer,
        warmup_iters=args.warmup,
        milestones=tuple(milestones),
        gamma=args.gamma,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    workflow.train(_data(args), args.preset, config, args.batch_size, args.out,
                   resume=args.resume, weights=args.weights,
                   backbone_weights=args.backbone_weights, min_size=args.min_size,
                   max_size=args.max_size, progress=not args.no_progress,
                   overwrite=args.overwrite, device=device, schedule=args.schedule,
                   config_changes=config_changes(args.set),
                   step_iterations=args.step_iterations)  # fmt: skip
    if args.schedule == "alternating":
        print(f"wrote {args.out}/checkpoint.npz (the final model) and each step's checkpoint.npz, "
              f"losses.jsonl and loss_curve.png in {args.out}/step1 .. step4")  # fmt: skip
    else:
        print(f"wrote {args.out}/checkpoint.npz, {args.out}/losses.jsonl, "
              f"{args.out}/loss_curve.png")  # fmt: skip
    return 0


def _check_train_arguments(args) -> None:
    """Refuse, before anything is built or written, the values that cannot train."""
    from minimask.model.config import get_config  # noqa: PLC0415

    _positive(args, "iterations", "batch_size", "checkpoint_every")
    try:  # an unknown field, a bad value or a combination the config refuses
        get_config(args.preset, **config_changes(args.set))
    except ValueError as e:
        raise UsageError(f"--set {' --set '.join(args.set)}: {e}") from None
    _check_schedule(args)
    for name, value in (("lr", args.lr), ("gamma", args.gamma)):
        if not (math.isfinite(value) and value > 0):  # NaN fails every comparison
            raise UsageError(f"--{name} {value}: must be a finite number above 0")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be 0 (no warm-up) or more iterations")
    min_size, max_size = _image_sizes(args)
    if min_size < 32:
        raise UsageError(f"--min-size {min_size}: must be at least 32 pixels (the stride of the "
                         "coarsest feature map)")  # fmt: skip
    if max_size < min_size:
        given = "--min-size" if args.min_size is not None else "the default --min-size"
        raise UsageError(f"--max-size {max_size} is below {given} {min_size}: the longer side "
                         "cannot be shorter than the shorter one")  # fmt: skip
    _out_folder(args.out)
    for path in (args.weights, args.backbone_weights):
        _check_archive(path)
    folders = [args.out] + [os.path.join(args.out, f"step{k}") for k in range(1, 5)]
    for folder in folders if args.resume else ():  # none: training starts afresh, with a note
        checkpoint = os.path.join(folder, "checkpoint.npz")
        if os.path.isfile(checkpoint):
            _check_archive(checkpoint)


def _check_schedule(args) -> None:
    """Refuse a schedule that does not exist, and step iterations that do not fit it."""
    if args.schedule not in ("joint", "alternating"):
        raise UsageError(f"--schedule {args.schedule}: use joint or alternating")
    steps = args.step_iterations
    if steps is not None and args.schedule != "alternating":
        raise UsageError("--step-iterations needs --schedule alternating (joint training has "
                         "one step: give --iterations)")  # fmt: skip
    if steps is not None and len(steps) != 4:
        raise UsageError(f"--step-iterations {' '.join(map(str, steps))}: give 4 counts, one "
                         "per step")  # fmt: skip
    for k, n in enumerate(steps or (), start=1):
        if n < 1:
            raise UsageError(f"--step-iterations: step {k} has {n}; each step needs at least 1")
    if args.schedule == "alternating" and steps is None and args.iterations < 4:
        raise UsageError(f"--iterations {args.iterations}: --schedule alternating needs at least "
                         "4, one per step (or give --step-iterations)")  # fmt: skip


def _image_sizes(args) -> tuple[int, int]:
    """The (min_size, max_size) a training run will use: the options, or the data's defaults."""
    from minimask import workflow  # noqa: PLC0415
    from minimask.model.config import get_config  # noqa: PLC0415

    if args.dataset == "coco":
        defaults = workflow.COCO_MIN_SIZE, workflow.COCO_MAX_SIZE
    else:
        preset = get_config(args.preset)
        defaults = preset.min_size, preset.max_size
    min_size = defaults[0] if args.min_size is None else args.min_size
    return min_size, defaults[1] if args.max_size is None else args.max_size


def _check_archive(path: str | None) -> None:
    """Refuse a damaged zip archive (a checkpoint ``.npz``, torch's ``.pth``): NumPy and torch
    read each array without checking its CRC, so flipped bytes would load as wrong weights."""
    if path is None or not zipfile.is_zipfile(path):
        return  # missing, or another format: the reader says what is wrong
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()  # reads every member, checking its CRC
    if damaged is not None:
        raise UsageError(f"{path} is damaged ({damaged} does not read back intact); copy it "
                         "again or use another file")  # fmt: skip


# ---------------------------------------------------------------------------- eval
def _add_model_options(p) -> None:
    p.add_argument("--checkpoint", default=None, help="a minimask checkpoint.npz")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="or any Mask R-CNN's weights (torchvision's .pth, .safetensors); "
                   "torchvision's 91-class COCO labels are COCO category ids")  # fmt: skip
    p.add_argument(
        "--preset",
        default="r50_fpn",
        choices=_presets(),
        help="with --weights: the architecture (default r50_fpn at 800/1333 px)",
    )


def _load_model(args):
    """The model of ``--checkpoint`` or ``--weights``, refused if its file is damaged, does not
    fit, or holds weights that are not finite (a run that diverged); errors name the file."""
    import numpy as np  # noqa: PLC0415

    from minimask.backend import to_host  # noqa: PLC0415
    from minimask.model.checkpoint import load_model  # noqa: PLC0415

    checkpoint, weights = args.checkpoint, getattr(args, "weights", None)  # export: no --weights
    if bool(checkpoint) == bool(weights):
        raise UsageError("give --checkpoint FILE or --weights FILE")
    path = checkpoint or weights
    _check_archive(path)
    try:
        model, meta = load_model(checkpoint, weights, getattr(args, "preset", "r50_fpn"))
    except (KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        message = str(e.args[0] if e.args else type(e).__name__)
        if path not in message:
            message = f"{path}: {message}"
        hint = (
            "give a checkpoint.npz written by minimask train (other weights go with --weights)"
            if checkpoint
            else "give torchvision's .pth, a .safetensors or a minimask checkpoint"
        )
        raise UsageError(f"{message}; {hint}") from e
    state = model.state_dict()
    bad = [name for name, value in state.items() if not np.isfinite(to_host(value)).all()]
    if bad:
        raise UsageError(
            f"{path} holds non-finite weights ({bad[0]} and {len(bad) - 1} more "
            "arrays): it comes from a run that diverged; use an earlier checkpoint"
        )
    return model, meta


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="COCO-style AP of a checkpoint on a dataset")
    _add_model_options(p)
    p.add_argument("--dataset", default="shapes", choices=DATASETS)
    _add_coco_options(p, split="val2017")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--val-images", type=int, default=100, help="shapes: validation images")
    p.add_argument("--seed", type=int, default=0, help="shapes: seed of the validation split")
    p.add_argument("--out", default=None,
                   help="folder for metrics, results and plots (default: beside the "
                   "checkpoint, or runs/eval)")  # fmt: skip
    _add_device(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_eval)


def _add_coco_options(p, split: str) -> None:
    p.add_argument(
        "--root",
        default=None,
        help="coco: folder with annotations/instances_<split>.json and <split>/",
    )
    p.add_argument("--split", default=split, help=f"coco: split name (default {split})")
    p.add_argument("--keypoints", action="store_true",
                   help="coco: person_keypoints_<split>.json, for a keypoint head")  # fmt: skip


def _need_root(args) -> None:
    if not args.root:
        raise UsageError("--dataset coco needs --root DIR")


def _run_eval(args) -> int:
    from minimask import workflow  # noqa: PLC0415

    _positive(args, "batch_size", "val_images", "max_images")
    device = _device(args)
    _out_folder(args.out)
    model, meta = _load_model(args)
    model.to(device)
    trained_on = meta.get("dataset")  # None for weights from elsewhere
    if args.checkpoint and trained_on not in (None, args.dataset):
        also = " --root DIR" if trained_on == "coco" else ""
        raise UsageError(
            f"{args.checkpoint} was trained on {trained_on!r}, not "
            f"{args.dataset!r}: evaluate it with --dataset {trained_on}{also}"
        )
    data = _data(args)
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
        "<name>_pred.png per image and detections.json with every detection as a COCO result. "
        "Two files of the same name (a.png, a.jpg) give a_pred.png and a_2_pred.png. A file "
        "that cannot be read is skipped and named; the exit status is then 1.",
    )
    _add_model_options(p)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG...)")
    p.add_argument("--out", default="runs/predict", help="folder for the drawings and JSON")
    p.add_argument("--score-thresh", type=float, default=0.5, help="drawing threshold")
    _add_device(p)
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from minimask import workflow  # noqa: PLC0415

    device = _device(args)
    _out_folder(args.out)
    model, meta = _load_model(args)
    model.to(device)
    written, skipped = workflow.predict_files(model, meta, args.images, args.out,
                                              args.score_thresh)  # fmt: skip
    for path in written:
        print(path)
    for message in skipped:
        print(f"minimask predict: skipped {message}", file=sys.stderr)
    if skipped:
        print(f"minimask predict: {len(skipped)} of {len(args.images)} files could not be read "
              "(named above); the others were predicted", file=sys.stderr)  # fmt: skip
        return 1
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
    from minimask.model.weights import export_weights  # noqa: PLC0415

    model, _ = _load_model(args)
    export_weights(model, args.to)
    print(f"wrote {args.to}")
    return 0


# ---------------------------------------------------------------------------- data
def _add_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (subset, import)")
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
    i = tools.add_parser(
        "import",
        help="convert labelme, VIA or mask-folder annotations to the COCO layout",
        description="Convert your own annotations into OUT/annotations/instances_<split>.json "
        "plus copies of the images in OUT/<split>/, ready for minimask train --dataset coco "
        "--root OUT. Formats: labelme (a folder of labelme .json files), via (a VGG Image "
        "Annotator 1.x/2.x .json export, the images beside it), masks (SRC/images/<stem>.png "
        "and SRC/masks/<stem>/<instance>_<category>.png, one PNG per instance). "
        "See docs/coco.md, 'Your own data'.",
    )
    i.add_argument("--from", dest="source_format", required=True,
                   choices=("labelme", "via", "masks"), help="the source's format")  # fmt: skip
    i.add_argument("src", metavar="SRC", help="the source folder (or file: labelme, via)")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--split", default="train2017",
                   help="split name (default train2017, what minimask train reads; import a "
                   "validation set with --split val2017 and the same --categories)")  # fmt: skip
    i.add_argument("--categories", default=None,
                   help="comma-separated names, numbered 1..K in this order (default: every "
                   "name found, sorted); regions of other names are left out")  # fmt: skip
    i.add_argument("--attribute", default=None,
                   help="via: the region attribute holding the category (default: the region's "
                   "only attribute)")  # fmt: skip
    i.add_argument(
        "--default-category",
        default=None,
        help="via: the category of regions with no attribute (e.g. balloon)",
    )
    i.set_defaults(run=_run_data_import)


def _run_data_subset(args) -> int:
    from minimask.data.subset import build_subset  # noqa: PLC0415

    _positive(args, "max_images")
    _out_folder(args.out)
    build_subset(args.annotations, args.images, args.out, args.categories, args.max_images,
                 args.min_area, args.split, progress=not args.no_progress)  # fmt: skip
    return 0


def _run_data_import(args) -> int:
    from minimask.data.importers import import_dataset  # noqa: PLC0415

    _out_folder(args.out)
    import_dataset(args.source_format, args.src, args.out, args.split, args.categories,
                   args.attribute, args.default_category)  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimask", description="A from-scratch, teachable Mask R-CNN on NumPy and CuPy."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error, user errors included")  # fmt: skip
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
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, and return its exit status.

    A user error (:func:`user_error_message`) or Ctrl-C ends the command as argparse ends on a
    bad option: the message on stderr, then :class:`CommandError`, a ``SystemExit`` with status
    2 (130 for Ctrl-C) whose ``str()`` is the message. Bugs, and with ``--debug`` everything,
    propagate with their traceback.
    """
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.run(args)
    name = f"data {args.tool}" if args.command == "data" else args.command
    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        message, status = f"minimask {name}: {_interrupted(args, e)}", 130
    except Exception as e:
        text = user_error_message(e, args)
        if text is None:
            raise  # a bug: its traceback is what a report of it needs
        message, status = f"minimask {name}: {text}", 2
    print(message, file=sys.stderr)
    raise CommandError(message, status)


# ---------------------------------------------------------------------------- errors
class UsageError(Exception):
    """Arguments that cannot work; reported, like every user error, in one line (status 2)."""


class CommandError(SystemExit):
    """How :func:`main` ends a command on a user error or Ctrl-C, once the message is printed:
    ``code`` is the exit status and ``str()`` the message (for callers that catch it)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.code = status


# Operating-system errors that come from the user's files or disk, with what to do about each.
_OS_ERROR_HINTS = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "it is a file where a folder is needed: give another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: give another path",
    errno.EISDIR: "give a file, not a folder",
    errno.EACCES: "check its permissions, or write elsewhere (--out)",
    errno.EPERM: "check its permissions, or write elsewhere (--out)",
    errno.EROFS: "write elsewhere (--out)",
    errno.ENOSPC: "free some space or write elsewhere (--out)",  # disk full
    errno.EDQUOT: "free some space or write elsewhere (--out)",  # over the disk quota
}
_MAX_MESSAGE = 400  # characters: a longer message is cut in the middle (--debug shows it)


def user_error_message(error: Exception, args) -> str | None:
    """The line to print for ``error`` if it is a user error; None if it is a bug.

    User errors: :class:`UsageError`; ``ValueError`` and its kinds (a bad annotation file,
    image, weights file or checkpoint: ``CocoFormatError``, ``BadImageError``, ``WeightsError``);
    a damaged zip archive; a ``KeyError`` from loading a state dict; the operating system's
    errors about files and disks (:data:`_OS_ERROR_HINTS`); no usable GPU (``DeviceError``);
    and a diverged training run (``NonFiniteLossError``, whose several lines are kept: the NaN
    detective's report and the last good checkpoint).
    """
    from minimask.backend import DeviceError  # noqa: PLC0415
    from minimask.train import NonFiniteLossError  # noqa: PLC0415

    if isinstance(error, NonFiniteLossError):
        return f"{error}\nlower --lr (or lengthen --warmup) and train again"
    if isinstance(error, (zipfile.BadZipFile, zlib.error, EOFError)):
        files = " or ".join(_inputs(args)) or "an input file"
        return f"{files} is damaged or truncated ({error}); copy it again or use another"
    if isinstance(error, FileNotFoundError) or (
        isinstance(error, OSError) and error.errno in _OS_ERROR_HINTS
    ):
        what = error.strerror or str(error)  # minimask's own raise FileNotFoundError("...")
        where = f": {error.filename}" if error.filename else ""
        return f"{what}{where}; {_OS_ERROR_HINTS.get(error.errno, 'check the path')}"
    message = " ".join(str(error.args[0] if error.args else error).split())  # one line
    state_error = isinstance(error, KeyError) and message.startswith("load_state_dict")
    if not (isinstance(error, (UsageError, ValueError, DeviceError)) or state_error):
        return None
    if state_error:  # the arrays of a model file that does not fit the model: name the file
        message = f"{' or '.join(_inputs(args))}: {message}; is it another preset's?"
    if len(message) > _MAX_MESSAGE:  # keep the start (what is wrong) and the end (what to do)
        cut = len(message) - _MAX_MESSAGE
        head, tail = message[: _MAX_MESSAGE - 100], message[-100:]
        message = f"{head} [... {cut} characters cut: --debug shows them] {tail}"
    if not _raised_in_minimask(error):  # NumPy's words about its own internals
        message += " (minimask --debug shows where)"
    return message


def _inputs(args) -> list[str]:
    """The model files a command reads (to name the one that turns out damaged)."""
    files = [getattr(args, name, None) for name in ("checkpoint", "weights", "backbone_weights")]
    if getattr(args, "resume", False):
        files.append(os.path.join(args.out, "checkpoint.npz"))
    return [f for f in files if f]


def _raised_in_minimask(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is minimask's own code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return tb is None or os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package)


def _interrupted(args, error: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C: what the interrupted command says it saved, and how to go on."""
    from minimask.train import TrainingInterrupted  # noqa: PLC0415

    if isinstance(error, TrainingInterrupted):  # it says what it saved and how to go on
        return str(error)
    said = f" ({error})" if str(error) else ""
    if args.command == "train":  # the last checkpoint (alternating training: its last step's)
        folders = [args.out] + [os.path.join(args.out, f"step{k}") for k in range(4, 0, -1)]
        for checkpoint in (os.path.join(folder, "checkpoint.npz") for folder in folders):
            if os.path.isfile(checkpoint):
                return f"interrupted{said}; --resume continues from {checkpoint}"
    return f"interrupted{said}"
