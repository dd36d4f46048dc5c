"""2-D convolution and transposed convolution: plain array functions, then engine ops.

Every layer of Mask R-CNN's ResNet backbone, FPN, RPN and heads is a ``conv2d`` (He et al. 2017,
§3 and §4); the mask head upsamples its 14x14 features to 28x28 with a 2x2, stride-2
``conv_transpose2d``. Layouts follow torch::

    conv2d:            x (N, C, H, W), weight (O, C, kh, kw)  ->  (N, O, Ho, Wo)
    conv_transpose2d:  x (N, C, H, W), weight (C, O, kh, kw)  ->  (N, O, Ho, Wo)

    out[n, o, h, w] = sum_{c, i, j} x_pad[n, c, h*s + i*d, w*s + j*d] * weight[o, c, i, j]

with stride ``s``, dilation ``d``, and ``x_pad`` zero-padded by ``p`` on each side, so that
``Ho = (H + 2p - d(kh - 1) - 1) // s + 1``.

Shape letters: N images, C input channels, O output channels, H x W input size, Ho x Wo output
size, kh x kw kernel, K rows of a column matrix (kernel taps x C), B rows per image once the images
are stacked, L columns of a GEMM.

How it is computed. NumPy's fastest operation is the matrix product (BLAS GEMM), so a conv becomes
``weight (O, K) @ columns (K, L)``, where each column holds the input values one output pixel sees.
Copying every kernel tap of every pixel (textbook "im2col") is slow: for a 3x3 kernel it copies the
input 9 times. Three cases:

* **1x1 kernels** are a matmul over channels: ``(O, C) @ (N, C, H*W)``, with no copy at all.
* **stride 1, the "row shift"**: the padded images are stacked vertically into one tall image
  (rows flattened after one another), and only the ``kw`` horizontal taps are copied, into
  ``cols[(j, c), r*Wo + w] = x_stack[c, r, w + j*d]``. Kernel row ``i`` reads image row
  ``r + i*d``, which is column ``r*Wo + w + i*d*Wo`` of the *same* matrix: a view shifted by
  ``i*d*Wo`` columns. So ``out = sum_i W_i @ cols[:, i*d*Wo : i*d*Wo + L]``: ``kh`` GEMMs on views.
  Output rows that straddle two stacked images are computed and dropped.
* **stride > 1**: textbook im2col (all ``kh*kw`` taps copied, which stride makes small) and one GEMM.

The gradient with respect to the input is the *transposed* conv of the output gradient (that is
what a transposed conv is), and a stride-1 transposed conv is a conv with the kernel flipped, so
the backward pass reuses the forward machinery.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minimask.backend import get_array_module
from minimask.engine.tensor import Function, Tensor


def _pair(value) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``: one number per spatial axis (height, width)."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a conv along one axis: ``(size + 2p - d(k - 1) - 1) // s + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class ConvSaved(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    cols: object  # columns of x: (K, rows*Wo), or x itself (N, C, Ho*Wo) for a 1x1 kernel
    offsets: tuple | None  # column offset of each GEMM (one per kernel row); None for 1x1
    block: int  # B: rows per image in cols (only Ho of them are real outputs)
    weight: object  # (O, C, kh, kw)
    x_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple


# ---------------------------------------------------------------------------- conv2d, arrays
def _columns(x, kernel, stride, padding, dilation):
    """The column matrix of ``x`` (see the module docstring), its GEMM offsets and rows per image.

    Returns ``cols`` (K, rows*Wo) with K = (kh // len(offsets)) * kw * C, ``offsets`` and ``B``.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    Ho = conv_output_size(H, kh, sh, ph, dh)
    Wo = conv_output_size(W, kw, sw, pw, dw)
    x_cnhw = x.transpose(1, 0, 2, 3)  # (C, N, H, W): channels first, so one GEMM spans all images
    width = sw * (Wo - 1) + 1  # span of the input columns one horizontal tap reads

    if sh == 1:
        # Each image gets B rows: itself, plus padding shared with the next image (the bottom
        # padding of one image is the top padding of the next), and at least its Ho outputs.
        block = max(H + ph, Ho)
        spare = -(-dh * (kh - 1) // block)  # whole empty blocks below, for the shifted reads
        stacked = xp.zeros((C, N + spare, block, W + 2 * pw), x.dtype)
        stacked[:, :N, ph : ph + H, pw : pw + W] = x_cnhw
        rows = N * block + dh * (kh - 1)
        stacked = stacked.reshape(C, (N + spare) * block, W + 2 * pw)  # (C, all rows, Wp)
        cols = xp.empty((kw, C, rows, Wo), x.dtype)
        for j in range(kw):
            cols[j] = stacked[:, :rows, j * dw : j * dw + width : sw]
        offsets = tuple(i * dh * Wo for i in range(kh))
        return cols.reshape(kw * C, rows * Wo), offsets, block  # (kw*C, rows*Wo)

    padded = xp.zeros((C, N, H + 2 * ph, W + 2 * pw), x.dtype)
    padded[:, :, ph : ph + H, pw : pw + W] = x_cnhw
    height = sh * (Ho - 1) + 1
    cols = xp.empty((kh, kw, C, N, Ho, Wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[i, j] = padded[:, :, i * dh : i * dh + height : sh, j * dw : j * dw + width : sw]
    return cols.reshape(kh * kw * C, N * Ho * Wo), (0,), Ho  # (kh*kw*C, N*Ho*Wo)


def _weight_matrices(w, groups: int):
    """The weight as ``groups`` matrices (groups, O, K), K ordered like the rows of the columns.

    ``groups`` is 1 (im2col: every tap in one GEMM) or kh (row shift: one GEMM per kernel row).
    """
    O, C, kh, kw = w.shape
    w = w.reshape(O, C, groups, kh // groups, kw)
    return w.transpose(2, 0, 3, 4, 1).reshape(groups, O, -1)  # (groups, O, kh/groups * kw * C)


def _sum_shifted(per_row, offsets, N: int, block: int, Ho: int, Wo: int):
    """Add up the kernel rows' products, each shifted by its offset, into (N, O, Ho, Wo).

    ``out[n, o, h, w] = sum_g per_row[g, o, offsets[g] + (n*B + h)*Wo + w]`` for per_row of shape
    (groups, O, rows*Wo). Only the Ho real rows of each image's block of B rows are kept, and the
    sum is written straight into torch's (N, O, Ho, Wo) layout.
    """
    xp = get_array_module(per_row)
    O, length = per_row.shape[1], N * block * Wo

    def shifted(g):  # (N, O, Ho, Wo) view of kernel row g's product
        view = per_row[g, :, offsets[g] : offsets[g] + length].reshape(O, N, block, Wo)
        return view[:, :, :Ho].transpose(1, 0, 2, 3)

    out = xp.empty((N, O, Ho, Wo), dtype=per_row.dtype)
    if len(offsets) == 1:
        out[...] = shifted(0)
        return out
    xp.add(shifted(0), shifted(1), out=out)
    for g in range(2, len(offsets)):
        out += shifted(g)
    return out


def conv2d_forward(x, w, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in torch) of plain arrays.

    Args:
        x: (N, C, H, W) input.
        w: (O, C, kh, kw) weight.
        stride, padding, dilation: an int, or a (height, width) pair.

    Returns:
        ``(out, saved)``: out (N, O, Ho, Wo) in x's dtype, and what :func:`conv2d_backward` needs.
    """
    xp = get_array_module(x, w)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    O, C_w, kh, kw = w.shape
    if C != C_w:
        raise ValueError(f"conv2d: x has {C} channels but the weight expects {C_w}: {w.shape}")
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"conv2d: a {kh}x{kw} kernel (dilation {dilation}) does not fit in the {H}x{W} input "
            f"padded by {padding}"
        )

    if (kh, kw) == (1, 1) and padding == (0, 0):
        # A 1x1 conv is a matmul over channels; with stride s it only sees every s-th pixel.
        x_seen = xp.ascontiguousarray(x[:, :, :: stride[0], :: stride[1]])
        cols = x_seen.reshape(N, C, Ho * Wo)  # (N, C, Ho*Wo)
        out = xp.matmul(w.reshape(O, C), cols)  # (N, O, Ho*Wo)
        saved = ConvSaved(cols, None, Ho, w, x.shape, stride, padding, dilation)
        return out.reshape(N, O, Ho, Wo), saved

    cols, offsets, block = _columns(x, (kh, kw), stride, padding, dilation)
    mats = _weight_matrices(w, len(offsets))  # (groups, O, K)
    # One GEMM for all kernel rows at once (stacked along M, which BLAS runs faster than
    # several thin GEMMs); each kernel row's product is then shifted into place.
    per_row = mats.reshape(-1, mats.shape[2]) @ cols  # (groups*O, rows*Wo)
    per_row = per_row.reshape(len(offsets), O, -1)  # (groups, O, rows*Wo)
    out = _sum_shifted(per_row, offsets, N, block, Ho, Wo)  # (N, O, Ho, Wo)
    return out, ConvSaved(cols, offsets, block, w, x.shape, stride, padding, dilation)


def _conv_weight_grad(grad_out, saved: ConvSaved):
    """d loss / d weight (O, C, kh, kw): the output gradient times the columns of x, transposed."""
    xp = get_array_module(grad_out)
    N, O, Ho, Wo = grad_out.shape
    _, C, kh, kw = saved.weight.shape
    if saved.offsets is None:  # 1x1: sum over images of (O, Ho*Wo) @ (Ho*Wo, C)
        per_image = xp.matmul(grad_out.reshape(N, O, Ho * Wo), saved.cols.transpose(0, 2, 1))
        return per_image.sum(axis=0).reshape(O, C, 1, 1)
    # grad of kernel row g = G @ cols[:, off_g : off_g + L].T = (G placed at off_g) @ cols.T, so
    # placing a copy of G at each offset makes one GEMM for all kernel rows (M = groups*O).
    groups, B = len(saved.offsets), saved.block
    placed = xp.zeros((groups, O, saved.cols.shape[1]), grad_out.dtype)  # (groups, O, rows*Wo)
    for g, offset in enumerate(saved.offsets):
        view = placed[g, :, offset : offset + N * B * Wo].reshape(O, N, B, Wo)
        view[:, :, :Ho] = grad_out.transpose(1, 0, 2, 3)  # zero at the dropped rows
    grads = placed.reshape(groups * O, -1) @ saved.cols.T  # (groups*O, K)
    grads = grads.reshape(groups, O, kh // groups, kw, C)
    return grads.transpose(1, 4, 0, 2, 3).reshape(O, C, kh, kw)


def conv2d_backward(grad_out, saved: ConvSaved, need_x: bool = True, need_w: bool = True):
    """Gradients of :func:`conv2d_forward`.

    Args:
        grad_out: (N, O, Ho, Wo) gradient of the output.
        saved: the second result of :func:`conv2d_forward`.
        need_x, need_w: skip a gradient that nobody needs (returned as None).

    Returns:
        ``(grad_x (N, C, H, W), grad_w (O, C, kh, kw))``. The gradient of x is the transposed conv
        of ``grad_out`` with the same weight, stride, padding and dilation.
    """
    grad_w = _conv_weight_grad(grad_out, saved) if need_w else None
    grad_x = None
    if need_x:
        (H, W), (kh, kw) = saved.x_shape[2:], saved.weight.shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = saved.stride, saved.padding, saved.dilation
        Ho, Wo = grad_out.shape[2:]
        # Input rows past the last window get no gradient: output_padding restores H exactly.
        extra = (
            H - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1),
            W - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1),
        )
        grad_x, _ = conv_transpose2d_forward(
            grad_out, saved.weight, saved.stride, saved.padding, extra, saved.dilation
        )
    return grad_x, grad_w


# ---------------------------------------------------------------------------- transposed, arrays
class ConvTransposeSaved(NamedTuple):
    x: object  # (N, C, H, W)
    weight: object  # (C, O, kh, kw)
    stride: tuple
    padding: tuple
    dilation: tuple


def _pad_or_crop(x, top: int, bottom: int, left: int, right: int):
    """Zero-pad (positive) or crop (negative) the last two axes of x (N, C, H, W)."""
    xp = get_array_module(x)
    x = x[:, :, max(-top, 0) : x.shape[2] - max(-bottom, 0), max(-left, 0) : x.shape[3] - max(-right, 0)]
    pads = ((0, 0), (0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)))
    return xp.pad(x, pads) if any(p for pair in pads for p in pair) else x


def conv_transpose2d_forward(x, w, stride=1, padding=0, output_padding=0, dilation=1):
    """Transposed convolution (the gradient of conv2d with respect to its input), as in torch.

    Each input pixel adds ``x[n, c, h, w] * weight[c, :, i, j]`` to output pixel
    ``(h*s - p + i*d, w*s - p + j*d)``, so ``Ho = (H - 1)s - 2p + d(kh - 1) + output_padding + 1``.

    Args:
        x: (N, C, H, W) input.
        w: (C, O, kh, kw) weight (torch's layout for transposed convs).
        stride, padding, output_padding, dilation: an int or a (height, width) pair.

    Returns:
        ``(out (N, O, Ho, Wo), saved)``.
    """
    xp = get_array_module(x, w)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    (oh, ow), (dh, dw) = _pair(output_padding), _pair(dilation)
    N, C, H, W = x.shape
    C_w, O, kh, kw = w.shape
    if C != C_w:
        raise ValueError(f"conv_transpose2d: x has {C} channels, the weight expects {C_w}")
    Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_transpose2d: padding {padding} leaves no output for {H}x{W}")
    saved = ConvTransposeSaved(x, w, (sh, sw), (ph, pw), (dh, dw))

    if (sh, sw) == (1, 1):
        # A stride-1 transposed conv is a conv with the kernel flipped and in/out channels
        # swapped, padded by d(k - 1) - p (cropped where that is negative).
        flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # (O, C, kh, kw)
        qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        if min(qh, qw) >= 0 and (oh, ow) == (0, 0):
            out, _ = conv2d_forward(x, flipped, 1, (qh, qw), (dh, dw))
        else:
            x = _pad_or_crop(x, qh, qh + oh, qw, qw + ow)
            out, _ = conv2d_forward(x, flipped, 1, 0, (dh, dw))
        return out, saved

    # Any stride: one GEMM gives every tap's contribution, then each tap is added at its place.
    x_mat = x.transpose(1, 0, 2, 3).reshape(C, N * H * W)  # (C, N*H*W)
    w_mat = w.transpose(2, 3, 1, 0).reshape(kh * kw * O, C)  # (kh*kw*O, C)
    taps = (w_mat @ x_mat).reshape(kh, kw, O, N, H, W)
    full = xp.zeros(
        (O, N, max((H - 1) * sh + dh * (kh - 1) + 1, ph + Ho), max((W - 1) * sw + dw * (kw - 1) + 1, pw + Wo)),
        x.dtype,
    )  # (O, N, rows, cols): the output before cropping the padding
    height, width = sh * (H - 1) + 1, sw * (W - 1) + 1
    for i in range(kh):
        for j in range(kw):
            full[:, :, i * dh : i * dh + height : sh, j * dw : j * dw + width : sw] += taps[i, j]
    out = full[:, :, ph : ph + Ho, pw : pw + Wo].transpose(1, 0, 2, 3)  # (N, O, Ho, Wo)
    return xp.ascontiguousarray(out), saved


def conv_transpose2d_backward(
    grad_out, saved: ConvTransposeSaved, need_x: bool = True, need_w: bool = True
):
    """Gradients of :func:`conv_transpose2d_forward`: ``(grad_x (N, C, H, W), grad_w (C, O, kh, kw))``.

    The adjoint of the adjoint: the gradient of x is conv2d of ``grad_out`` with the same weight,
    and the weight gradient is conv2d's weight gradient with the roles of x and grad_out swapped.
    """
    x = saved.x
    N, C, H, W = x.shape
    grad_x, conv_saved = conv2d_forward(
        grad_out, saved.weight, saved.stride, saved.padding, saved.dilation
    )  # (N, C, H', W'); H' > H only with output_padding at stride 1
    grad_w = None
    if need_w:
        Hc, Wc = grad_x.shape[2:]
        x_full = _pad_or_crop(x, 0, Hc - H, 0, Wc - W)  # (N, C, H', W')
        grad_w = _conv_weight_grad(x_full, conv_saved)  # (C, O, kh, kw)
    if need_x:
        grad_x = get_array_module(grad_x).ascontiguousarray(grad_x[:, :, :H, :W])
    else:
        grad_x = None
    return grad_x, grad_w


# ---------------------------------------------------------------------------- engine ops
class Conv2d(Function):
    """conv2d as an engine op; inputs ``(x, weight)`` or ``(x, weight, bias)``."""

    def forward(self, x, w, *bias, stride=1, padding=0, dilation=1):
        out, self.saved = conv2d_forward(x, w, stride, padding, dilation)
        self.has_bias = bool(bias)
        if bias:
            out += bias[0].reshape(1, -1, 1, 1)
        return out

    def backward(self, g):
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


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1):
    """2-D convolution of x (N, C, H, W) with weight (O, C, kh, kw) and optional bias (O,).

    Returns (N, O, Ho, Wo), ``Ho = (H + 2p - d(kh - 1) - 1) // s + 1``, as ``torch.nn.functional.conv2d``.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d.apply(
        *tensors, stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation)
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

    Returns (N, O, Ho, Wo), ``Ho = (H - 1)s - 2p + d(kh - 1) + output_padding + 1``, as
    ``torch.nn.functional.conv_transpose2d``. Mask R-CNN's mask head uses k = s = 2: each input
    pixel paints its own 2x2 block of the output.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d.apply(
        *tensors,
        stride=_pair(stride),
        padding=_pair(padding),
        output_padding=_pair(output_padding),
        dilation=_pair(dilation),
    )
