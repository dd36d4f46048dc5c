"""The ``minimask`` command line: ``minimask <command> [options]`` (or ``python -m minimask``).

Commands:
    demo    train a tiny CNN on synthetic shapes and report its held-out accuracy

Each command is a pair of plain functions, ``_add_<name>(subparsers)`` to declare its options and
``_run_<name>(args) -> exit code`` to do the work; a new command (``train``, ``eval``, ``predict``,
``data``) adds its pair and one line to :func:`build_parser`.
"""

from __future__ import annotations

import argparse


# ---------------------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
    from minimask.classifier_demo import DemoConfig  # noqa: PLC0415 - keep --help fast

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train a tiny CNN on synthetic shapes (CPU, about a minute)",
        description="Train a tiny CNN classifier built from minimask.nn on synthetic shapes, "
        "then print its held-out accuracy and write loss_curve.png and metrics.json.",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="training iterations")
    p.add_argument("--out", default="runs/demo", help="folder for the plot, metrics and weights")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of data and weights")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--device", choices=("cpu", "gpu"), default=defaults.device)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from minimask.classifier_demo import DemoConfig, run  # noqa: PLC0415

    if args.steps < 1:
        raise SystemExit("minimask demo: --steps must be at least 1")
    config = DemoConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device
    )
    run(config, out=args.out, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimask", description="A from-scratch, teachable Mask R-CNN on NumPy and CuPy."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    _add_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
