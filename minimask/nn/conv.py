"""2-D convolution and transposed convolution: the definition, then the engine ops.

Every layer of Mask R-CNN's ResNet backbone, FPN, RPN and heads is a ``conv2d`` (He et al. 2017,
§3-4); the mask head upsamples its 14x14 features to 28x28 with a 2x2, stride-2
``conv_transpose2d``. Layouts and formulas follow torch::

    conv2d:            x (N, C, H, W), weight (O, C, kh, kw)  ->  (N, O, Ho, Wo)
    out[n, o, h, w] = sum_{c, i, j} x_pad[n, c, h*s + i*d, w*s + j*d] * weight[o, c, i, j]
    Ho = (H + 2p - d(kh - 1) - 1) // s + 1      (x_pad: x with p zeros on each side)

    conv_transpose2d:  x (N, C, H, W), weight (C, O, kh, kw)  ->  (N, O, Ho, Wo)
    the gradient of conv2d with respect to its input, so Ho = (H - 1)s - 2p + d(kh - 1) + 1

Shape letters: N images, C input and O output channels, H x W input and Ho x Wo output size,
kh x kw kernel, s stride, p padding, d dilation.

``conv2d_plain`` below computes the definition one kernel tap at a time, in a few lines: read it
first. The engine ops use the fast form of ``minimask/nn/conv_fast.py`` (three copies of the
input and one large matrix product for a 3x3 conv), which tests check against it.
"""

from __future__ import annotations

from minimask.backend import get_array_module
from minimask.engine.tensor import Function, Tensor
from minimask.nn.conv_fast import (  # noqa: F401 - the array functions, re-exported
    ConvSaved,
    ConvTransposeSaved,
    Geometry,
    _pair,
    conv2d_backward,
    conv2d_forward,
    conv_geometry,
    conv_output_size,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    workspace,
)


# ---------------------------------------------------------------------------- the definition
def conv2d_plain(x, w, stride=1, padding=0, dilation=1):
    """conv2d by its definition, one kernel tap at a time: the reference for the fast form.

    x (N, C, H, W), weight w (O, C, kh, kw) -> (N, O, Ho, Wo). Kernel tap (i, j) sees the padded
    input shifted by (i*d, j*d) and read every s pixels; it adds its (O, C) mix of the channels.
    """
    xp = get_array_module(x, w)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = xp.zeros((N, O, Ho, Wo), dtype=xp.result_type(x, w))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (Ho - 1) * sh + 1, sh)
            cols = slice(j * dw, j * dw + (Wo - 1) * sw + 1, sw)
            seen = x_pad[:, :, rows, cols]  # (N, C, Ho, Wo)
            out += xp.einsum("nchw,oc->nohw", seen, w[:, :, i, j])
    return out


# ---------------------------------------------------------------------------- engine ops
class Conv2d(Function):
    """conv2d as an engine op; inputs ``(x, weight)`` or ``(x, weight, bias)``.

    ``relu=True`` applies the ReLU to the output in place: the same numbers as ``.relu()`` on
    the result, without a second map kept alive beside the first (the backward reads the ReLU's
    mask from the output, which the next op keeps anyway).
    """

    def forward(self, x, w, *bias, stride=1, padding=0, dilation=1, relu=False):
        out, self.saved = conv2d_forward(x, w, stride, padding, dilation)
        self.has_bias = bool(bias)
        if bias:
            out += bias[0].reshape(1, -1, 1, 1)
        self.relu_out = None
        if relu:  # out is this op's own fresh array: overwrite it
            self.relu_out = get_array_module(out).maximum(out, out.dtype.type(0), out=out)
        return out

    def backward(self, g):
        if self.relu_out is not None:
            g = g * (self.relu_out > 0)  # the ReLU's backward (engine/ops.py)
        grad_x, grad_w = conv2d_backward(g, self.saved, self.wants(0), self.wants(1))
        if not self.has_bias:
            return grad_x, grad_w
        return grad_x, grad_w, g.sum(axis=(0, 2, 3)) if self.wants(2) else None


class ConvTranspose2d(Function):
    """conv_transpose2d as an engine op; inputs ``(x, weight)`` or ``(x, weight, bias)``."""

    def forward(self, x, w, *bias, stride=1, padding=0, output_padding=0, dilation=1):
        out, self.saved = conv_transpose2d_forward(x, w, stride, padding, output_padding, dilation)
        self.has_bias = bool(bias)
        if bias:
            out += bias[0].reshape(1, -1, 1, 1)
        return out

    def backward(self, g):
        grad_x, grad_w = conv_transpose2d_backward(g, self.saved, self.wants(0), self.wants(1))
        if not self.has_bias:
            return grad_x, grad_w
        return grad_x, grad_w, g.sum(axis=(0, 2, 3)) if self.wants(2) else None


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    relu: bool = False,
):
    """2-D convolution of x (N, C, H, W) with weight (O, C, kh, kw) and optional bias (O,).

    Returns (N, O, Ho, Wo) with ``Ho = (H + 2p - d(kh - 1) - 1) // s + 1``, as
    ``torch.nn.functional.conv2d``. stride, padding, dilation: an int or a (height, width) pair.
    ``relu=True``: ``conv2d(...).relu()`` in one op (one map instead of two).
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d.apply(
        *tensors,
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        relu=relu,
    )


def conv_transpose2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
):
    """Transposed convolution of x (N, C, H, W) with weight (C, O, kh, kw) and optional bias (O,).

    Returns (N, O, Ho, Wo) with ``Ho = (H - 1)s - 2p + d(kh - 1) + output_padding + 1``, as
    ``torch.nn.functional.conv_transpose2d``. The mask head uses k = s = 2: each input pixel
    paints its own 2x2 block of the output.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d.apply(
        *tensors,
        stride=_pair(stride),
        padding=_pair(padding),
        output_padding=_pair(output_padding),
        dilation=_pair(dilation),
    )
