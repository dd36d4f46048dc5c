"""conv2d forward + backward (gradients of x and weight) at Mask R-CNN's layer shapes, vs torch.

``python -m minimask.bench conv [--repeat N]``. Rows: 3x3 convs (padding 1) of the ResNet/FPN
levels at N=2, two 1x1 convs, and the mask head's 3x3 conv on 64 RoIs of 14x14. C_in = C_out = C,
float32; both sides use the threads of ``--threads`` (default: every core).
"""

from __future__ import annotations

import numpy as np

from minimask.bench.timing import Case, run_cases
from minimask.engine import Tensor
from minimask.nn.conv import conv2d

# (N, C, H=W, kernel): the rows of the table
SHAPES = [
    (2, 64, 128, 3),
    (2, 128, 64, 3),
    (2, 256, 32, 3),
    (2, 256, 64, 1),
    (2, 512, 32, 1),
    (64, 256, 14, 3),  # mask head: 64 RoIs
]


def _case(N: int, C: int, H: int, k: int) -> Case:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = rng.standard_normal((C, C, k, k), dtype=np.float32) * np.float32(1 / np.sqrt(C * k * k))
    grad = rng.standard_normal((N, C, H, H), dtype=np.float32)
    pad = k // 2

    def ours():
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        conv2d(xt, wt, padding=pad).backward(grad)

    reference = None
    try:
        import torch  # noqa: PLC0415 - benchmark peer only

        tx, tw, tg = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(grad)

        def reference():
            xr, wr = tx.detach().requires_grad_(), tw.detach().requires_grad_()
            torch.nn.functional.conv2d(xr, wr, padding=pad).backward(tg)

    except ImportError:
        pass
    return Case(f"conv2d {k}x{k} N={N} C={C} H=W={H} fwd+bwd", ours, reference)


def main(repeat: int = 9) -> list[dict]:
    cases = [_case(*shape) for shape in SHAPES]
    return run_cases(cases, repeat=repeat, title="conv2d forward + backward", goal=1.2)


if __name__ == "__main__":
    main()
