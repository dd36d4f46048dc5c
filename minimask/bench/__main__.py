"""``python -m minimask.bench SUITE [--repeat N] [--threads N]``: print benchmark tables.

One thread policy for every suite: ``--threads N`` gives both sides N threads (NumPy's BLAS via
``minimask.backend.set_threads``, torch via ``torch.set_num_threads``); without it, both use
every core of the machine. Each table's header states the threads of both sides.
"""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "conv": "minimask.bench.conv",  # conv2d forward+backward at Mask R-CNN's layer shapes
    "ops": "minimask.bench.ops",  # roi_align, roi_pool and nms against torchvision
    "train": "minimask.bench.train",  # tiny Mask R-CNN vs torchvision's: speed, memory, AP
    "real": "minimask.bench.real",  # r50_fpn at 800 px vs torchvision's: time and peak memory
    "profile": "minimask.bench.profile",  # where one training step's time goes, per op
    "contention": "minimask.bench.contention",  # two trainings at once vs one alone
    "parity": "minimask.bench.parity",  # R50-FPN vs torchvision's, stage by stage, same weights
    "gpu": "minimask.bench.gpu",  # minimask on CuPy vs torch on CUDA: ops, train steps, memory
    "ablations": "minimask.bench.ablations",  # the paper's Table 2 switches, trained on shapes
    "keypoints": "minimask.bench.keypoints",  # the keypoint head's train step vs torchvision's
}
WITH_OPTIONS = ("train", "real", "profile", "contention", "parity", "ablations", "keypoints")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--repeat", type=int, default=None, help="runs per row (suite default)")
    parser.add_argument("--threads", type=int, default=None, help="threads of both sides")
    args, rest = parser.parse_known_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    from minimask.bench.timing import use_threads  # noqa: PLC0415

    if args.suite == "contention":  # its default is minimask's own policy, not a fixed count
        rest += [] if args.threads is None else ["--threads", str(args.threads)]
    else:
        use_threads(args.threads)
    suite = importlib.import_module(SUITES[args.suite])
    kwargs = {} if args.repeat is None else {"repeat": args.repeat}
    if args.suite in WITH_OPTIONS:
        suite.main(argv=rest, **kwargs)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        suite.main(**kwargs)


if __name__ == "__main__":
    main()
