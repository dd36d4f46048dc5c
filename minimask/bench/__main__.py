"""``python -m minimask.bench {conv,gpu,keypoints,ops,parity,train} [--repeat N]``: print tables."""

from __future__ import annotations

import argparse
import importlib

SUITES = {
    "conv": "minimask.bench.conv",  # conv2d forward+backward at Mask R-CNN's layer shapes
    "ops": "minimask.bench.ops",  # roi_align, roi_pool and nms against torchvision
    "train": "minimask.bench.train",  # tiny Mask R-CNN vs torchvision's: speed, memory, AP
    "parity": "minimask.bench.parity",  # R50-FPN vs torchvision's, stage by stage, same weights
    "gpu": "minimask.bench.gpu",  # minimask on CuPy vs torch on CUDA: ops, train steps, memory
    "keypoints": "minimask.bench.keypoints",  # the keypoint head's train step vs torchvision's
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the median is shown")
    args, rest = parser.parse_known_args(argv)
    suite = importlib.import_module(SUITES[args.suite])
    if args.suite in (
        "train",
        "parity",
        "keypoints",
    ):  # they have options of their own (see their --help)
        suite.main(repeat=args.repeat, argv=rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        suite.main(repeat=args.repeat)


if __name__ == "__main__":
    main()
