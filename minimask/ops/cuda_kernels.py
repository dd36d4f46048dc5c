"""CUDA kernels for RoIAlign and RoIPool: what the GPU runs when the features are CuPy arrays.

The array forms in ``roi_align.py`` and ``roi_pool.py`` are the reference: they define the
semantics, they are what the CPU runs and what the tests check against torchvision and against
the paper. On CuPy input their entry functions call the kernels below instead (a couple of lines
at the top of each), which compute the same thing the way torchvision's CUDA code does:

* **forward**: one thread per output element ``(k, c, ph, pw)``. RoIAlign's thread averages the
  bilinear samples of its bin; RoIPool's scans the cells of its bin for the max and records
  where it was (its argmax).
* **backward**: one thread per element of the output's gradient, which it adds into the
  features' gradient with ``atomicAdd`` (RoIAlign: to the four cells of each sample, weighted;
  RoIPool: to the argmax cell). Threads of overlapping RoIs add into the same cells, so the sums
  come out in no fixed order: equal to the array form's up to rounding, not bit for bit.

What the kernels buy on the GPU: one pass over the outputs, with no block planning, no windows,
no sparse table, no temporaries the size of the map, and no host synchronisation (the array
forms read a few numbers back to the host to plan their blocks, which stops the GPU's queue).

Semantics: those of the array forms, edge cases included
--------------------------------------------------------
Every rule of the module docstrings of ``roi_align.py`` and ``roi_pool.py`` holds here, in the
same arithmetic (the features' dtype, the same order of operations, no fused multiply-add):

* RoIAlign: ``spatial_scale``, the half-cell shift of ``aligned``, the legacy 1×1 minimum when
  not ``aligned``, the sampling ratio (``ceil(roi_size / out_size)`` samples per bin and axis when
  ``<= 0``), samples outside ``[-1, size]`` counting 0 in the average, clamping onto the last
  cell centre. A RoI whose adaptive grid has no sample (an empty or, when ``aligned``, inverted
  box) gives 0.
* RoIAlign's NaN locality: a cell is read only when its weight is non-zero along both axes, and a
  NaN or inf read counts in full (added as itself, not times its weight): a non-finite value
  reaches exactly the bins whose samples interpolate it with a non-zero weight, as in the array
  form, and in backward a non-finite gradient reaches exactly the cells its bin weighs.
* RoIPool: C's rounding of the scaled corners, ``f = floor(|x|); f + (|x| - f >= 0.5)``, with
  the sign put back; the inclusive ``+ 1`` of the box size; the bins' floor/ceil edges, clipped
  to the map; empty bins give 0 and argmax -1. The scan is row-major and keeps the first of equal
  maxima; NaNs are skipped, so a bin of nothing but NaN gives NaN (not torchvision's -FLT_MAX),
  and float64 values below -FLT_MAX keep their true max and get the gradient.
* Integer casts as NumPy's on x86: a float that does not fit in int64 (NaN, ±inf, |x| >= 2^63:
  a RoI with NaN or huge coordinates) becomes INT64_MIN, and int64 sums wrap around, where a C
  cast or overflow would be undefined. So RoIPool gives such a RoI what its array form gives
  (empty bins: 0, no gradient), and RoIAlign's adaptive grid for it is empty as in its array form.

Where the kernels and the array forms may differ, on purpose or by necessity:

* sums are rounded in another order (the array form's matrix products, the kernels' loops and
  atomics), so the results agree to rounding: the tests allow 1e-10 relative in float64 and
  1e-4 in float32;
* a RoIAlign term is ``(wy * wx) * v`` here, ``wy * v`` then ``* wx`` in the array form's
  products: where two tiny weights meet (below about 1e-22 each in float32), one may underflow to
  0 where the other does not (a finite term only: NaN and inf count in full either way);
* RoIPool on a bin of nothing but NaN: the kernel's argmax is the bin's first NaN in row-major
  order; the array form's is one of the bin's NaN cells, chosen by an unstable sort. Both outputs
  are NaN;
* a RoI whose image index is not a valid image after the int64 cast (a NaN index, which
  ``check_rois`` lets through): the kernels give 0 and (RoIPool) argmax -1; the array forms leave
  those outputs unset;
* RoIAlign on a RoI with a NaN or infinite corner: the kernel gives 0 and no gradient (its
  samples are at NaN or infinite positions, outside the map); the array form raises a ValueError
  (a negative index in its weight matrices);
* RoIAlign with an adaptive grid on a huge RoI: G = ceil(size / bins) samples per bin and axis,
  so G² per bin, each a loop step of one thread (a RoI of 10^6 cells at 7×7 bins: 2·10^10 steps
  per bin, as long as torchvision's kernel takes). The array form runs out of memory instead.
  The model pools clipped boxes, whose grids are small.

Shape letters: N images, C channels, H×W the map, K RoIs, PH×PW the output grid.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

THREADS = 256  # threads per block
MAX_BLOCKS = 65536  # more outputs than blocks × threads: each thread takes several (grid stride)

ENABLED = True  # False: CuPy input runs the array forms too (the tests compare the two)

# ---------------------------------------------------------------------------- the CUDA source
# Compiled once per process by NVRTC (through cupy.RawModule) for float and double, with
# --fmad=false: no fused multiply-add, so every product is rounded as NumPy rounds it.
CUDA_SOURCE = r"""
// -------------------------------------------------------------------- integer helpers
// NumPy's cast of a float to int64, as on x86: a value that does not fit (NaN, +-inf,
// |v| >= 2^63) becomes INT64_MIN. A plain C cast of such a value is undefined.
template <typename T>
__device__ __forceinline__ long long to_int64(T v) {
  const T limit = (T)9223372036854775808.0;  // 2^63, exact in float and double
  return (v >= -limit && v < limit) ? (long long)v : (-9223372036854775807LL - 1);
}

// int64 sums that wrap around on overflow, as NumPy's do (signed overflow is undefined in C++).
__device__ __forceinline__ long long add_wrap(long long a, long long b) {
  return (long long)((unsigned long long)a + (unsigned long long)b);
}

__device__ __forceinline__ long long sub_wrap(long long a, long long b) {
  return (long long)((unsigned long long)a - (unsigned long long)b);
}

__device__ __forceinline__ long long clip(long long v, long long lo, long long hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// -------------------------------------------------------------------- RoIAlign
// One axis of a RoI (roi_align.roi_weights): its first coordinate on the map (in cells), the
// length of a bin, and the samples per bin.
template <typename T>
struct Axis {
  T start, bin;
  long long grid;
};

template <typename T>
__device__ Axis<T> roi_axis(T lo, T hi, T scale, T offset, int aligned, int bins,
                            int sampling_ratio) {
  Axis<T> a;
  a.start = lo * scale - offset;
  T length = (hi * scale - offset) - a.start;
  if (!aligned && length < (T)1) length = (T)1;  // legacy: at least one cell (NaN stays NaN)
  a.bin = length / (T)bins;
  a.grid = sampling_ratio > 0 ? (long long)sampling_ratio : to_int64(ceil(length / (T)bins));
  return a;
}

// Sample s of bin p along one axis (roi_align.axis_weights): the two cells it interpolates and
// their weights, the 1/G of the average included. False for a sample outside [-1, size] (or at
// a NaN position): it counts 0.
template <typename T>
__device__ bool axis_sample(const Axis<T>& a, int p, long long s, int size, int* low, int* high,
                            T* w_low, T* w_high) {
  const T count = (T)(a.grid > 1 ? a.grid : 1);
  T pos = a.start + (T)p * a.bin + ((T)s + (T)0.5) * a.bin / count;
  if (!(pos >= (T)-1 && pos <= (T)size)) return false;
  if (pos < (T)0) pos = (T)0;
  const T cell = floor(pos);
  const bool at_end = cell >= (T)(size - 1);  // past the last cell centre: all on the last cell
  const T frac = at_end ? (T)0 : pos - cell;
  *low = at_end ? size - 1 : (int)cell;
  *high = *low + 1 < size ? *low + 1 : size - 1;
  const T w = (T)1 / count;
  *w_low = w * ((T)1 - frac);
  *w_high = w * frac;
  return true;
}

// sum += wy * wx * (*cell). A cell of weight 0 along either axis is not read, and a NaN or inf
// counts in full however small its weight: a non-finite value reaches exactly the bins that
// interpolate it (roi_align.py, "Non-finite values").
template <typename T>
__device__ __forceinline__ void add_term(T& sum, T wy, T wx, const T* cell) {
  if (wy == (T)0 || wx == (T)0) return;
  const T v = *cell;
  sum += isfinite(v) ? wy * wx * v : v;
}

// The transpose: *cell += wy * wx * g, atomically (other threads add into the same cells).
template <typename T>
__device__ __forceinline__ void scatter_term(T* cell, T wy, T wx, T g) {
  if (wy == (T)0 || wx == (T)0) return;
  atomicAdd(cell, isfinite(g) ? wy * wx * g : g);
}

// Forward: one thread per output (k, c, ph, pw), the average of its bin's samples.
// Backward (grad != 0): the same walk, adding grad_out[i] times each weight into grad.
template <typename T>
__device__ void roi_align_walk(const T* __restrict__ features, const double* __restrict__ image,
                               const T* __restrict__ boxes, const long long total, const int N,
                               const int C, const int H, const int W, const int PH, const int PW,
                               const T scale, const T offset, const int aligned,
                               const int sampling_ratio, T* __restrict__ out,
                               const T* __restrict__ grad_out, T* __restrict__ grad) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    const int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / ((long long)PW * PH) % C);
    const long long k = i / ((long long)PW * PH * C);
    const long long n = to_int64(image[k]);  // as NumPy's astype(int64): NaN gives INT64_MIN
    const T g = grad == 0 ? (T)0 : grad_out[i];
    T sum = (T)0;
    if (n >= 0 && n < N) {  // else a RoI of no image: 0, no gradient
      const T* box = boxes + 4 * k;  // x1, y1, x2, y2 in image pixels
      const Axis<T> ay = roi_axis(box[1], box[3], scale, offset, aligned, PH, sampling_ratio);
      const Axis<T> ax = roi_axis(box[0], box[2], scale, offset, aligned, PW, sampling_ratio);
      const long long plane = (n * C + c) * (long long)H * W;  // map (n, c) in features or grad
      for (long long sy = 0; sy < ay.grid; sy++) {
        int y0, y1;
        T wy0, wy1;
        if (!axis_sample(ay, ph, sy, H, &y0, &y1, &wy0, &wy1)) continue;
        for (long long sx = 0; sx < ax.grid; sx++) {
          int x0, x1;
          T wx0, wx1;
          if (!axis_sample(ax, pw, sx, W, &x0, &x1, &wx0, &wx1)) continue;
          const long long r0 = plane + (long long)y0 * W, r1 = plane + (long long)y1 * W;
          if (grad == 0) {
            add_term(sum, wy0, wx0, features + r0 + x0);
            add_term(sum, wy0, wx1, features + r0 + x1);
            add_term(sum, wy1, wx0, features + r1 + x0);
            add_term(sum, wy1, wx1, features + r1 + x1);
          } else {
            scatter_term(grad + r0 + x0, wy0, wx0, g);
            scatter_term(grad + r0 + x1, wy0, wx1, g);
            scatter_term(grad + r1 + x0, wy1, wx0, g);
            scatter_term(grad + r1 + x1, wy1, wx1, g);
          }
        }
      }
    }
    if (grad == 0) out[i] = sum;
  }
}

template <typename T>
__global__ void roi_align_forward(const T* __restrict__ features,
                                  const double* __restrict__ image,
                                  const T* __restrict__ boxes, const long long total, const int N,
                                  const int C, const int H, const int W, const int PH,
                                  const int PW, const T scale, const T offset, const int aligned,
                                  const int sampling_ratio, T* __restrict__ out) {
  roi_align_walk<T>(features, image, boxes, total, N, C, H, W, PH, PW, scale, offset, aligned,
                    sampling_ratio, out, 0, 0);
}

template <typename T>
__global__ void roi_align_backward(const T* __restrict__ grad_out,
                                   const double* __restrict__ image,
                                   const T* __restrict__ boxes, const long long total,
                                   const int N, const int C, const int H, const int W,
                                   const int PH, const int PW, const T scale, const T offset,
                                   const int aligned, const int sampling_ratio,
                                   T* __restrict__ grad) {
  roi_align_walk<T>(0, image, boxes, total, N, C, H, W, PH, PW, scale, offset, aligned,
                    sampling_ratio, 0, grad_out, grad);
}

// -------------------------------------------------------------------- RoIPool
// C's round: halves away from zero, the fraction compared with 1/2 exactly
// (roi_pool._round_half_away).
template <typename T>
__device__ __forceinline__ T round_half_away(T x) {
  const T size = fabs(x), whole = floor(size);
  const T r = whole + (size - whole >= (T)0.5 ? (T)1 : (T)0);
  return x < (T)0 ? -r : r;
}

// Bin p of a RoI along one axis (roi_pool.roi_bins): cells [*start, *end), clipped to the map.
template <typename T>
__device__ void pool_bin(T lo, T hi, T scale, int bins, int p, int size, long long* start,
                         long long* end) {
  const long long first = to_int64(round_half_away(lo * scale));
  const long long last = to_int64(round_half_away(hi * scale));
  long long length = add_wrap(sub_wrap(last, first), 1);  // inclusive, the legacy "+ 1"
  if (length < 1) length = 1;
  const T bin = (T)length / (T)bins;
  *start = clip(add_wrap(to_int64(floor((T)p * bin)), first), 0, size);
  *end = clip(add_wrap(to_int64(ceil(((T)p + (T)1) * bin)), first), 0, size);
}

// One thread per output (k, c, ph, pw): the max of its bin and the flat index of the cell that
// holds it. Row-major scan; a later cell wins only with a larger value (ties: the first), or
// with any number over a NaN (NaNs are skipped unless the bin holds nothing else).
template <typename T, typename I>
__global__ void roi_pool_forward(const T* __restrict__ features,
                                 const double* __restrict__ image,
                                 const T* __restrict__ boxes, const long long total, const int N,
                                 const int C, const int H, const int W, const int PH,
                                 const int PW, const T scale, T* __restrict__ out,
                                 I* __restrict__ argmax) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    const int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / ((long long)PW * PH) % C);
    const long long k = i / ((long long)PW * PH * C);
    const long long n = to_int64(image[k]);  // as NumPy's astype(int64): NaN gives INT64_MIN
    long long y0 = 0, y1 = 0, x0 = 0, x1 = 0, plane = 0;  // an empty bin unless n is an image
    if (n >= 0 && n < N) {
      const T* box = boxes + 4 * k;  // x1, y1, x2, y2 in image pixels
      pool_bin(box[1], box[3], scale, PH, ph, H, &y0, &y1);
      pool_bin(box[0], box[2], scale, PW, pw, W, &x0, &x1);
      plane = (n * C + c) * (long long)H * W;  // map (n, c) in features
    }
    T best = (T)0;  // an empty bin gives 0 ...
    long long arg = -1;  // ... and passes no gradient
    for (long long y = y0; y < y1; y++) {
      for (long long x = x0; x < x1; x++) {
        const long long cell = plane + y * W + x;
        const T v = features[cell];
        if (arg < 0 || v > best || (isnan(best) && !isnan(v))) {
          best = v;
          arg = cell;
        }
      }
    }
    out[i] = best;
    argmax[i] = (I)arg;
  }
}

// One thread per output: its gradient goes to its argmax cell (none for an empty bin).
template <typename T, typename I>
__global__ void roi_pool_backward(const T* __restrict__ grad_out, const I* __restrict__ argmax,
                                  const long long total, T* __restrict__ grad) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)blockDim.x * gridDim.x) {
    const long long cell = argmax[i];
    if (cell >= 0) atomicAdd(grad + cell, grad_out[i]);
  }
}
"""

_SCALARS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INDICES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}
# Every instantiation, by the name NVRTC is asked to compile it under.
KERNEL_NAMES = [f"roi_align_{d}<{t}>" for d in ("forward", "backward") for t in _SCALARS.values()]
KERNEL_NAMES += [
    f"roi_pool_{d}<{t}, {i}>"
    for d in ("forward", "backward")
    for t in _SCALARS.values()
    for i in _INDICES.values()
]
COMPILE_OPTIONS = ("--fmad=false",)
_module = None


def use_kernel(x) -> bool:
    """True when ``x`` is an array of the real CuPy, which can compile and launch the kernels.

    An array of any other library, a CPU stand-in for CuPy included (it has no ``RawModule``),
    runs the array forms.
    """
    if not ENABLED or not type(x).__module__.startswith("cupy"):
        return False
    return hasattr(sys.modules.get("cupy"), "RawModule")


def _kernel(name: str):
    """The compiled kernel ``name`` (one of :data:`KERNEL_NAMES`); compiles all on first use."""
    global _module
    if _module is None:
        import cupy  # noqa: PLC0415 - only with CuPy

        _module = cupy.RawModule(
            code=CUDA_SOURCE, options=COMPILE_OPTIONS, name_expressions=KERNEL_NAMES
        )
    return _module.get_function(name)


def _launch(name: str, total: int, args: tuple) -> None:
    """Run kernel ``name`` with one thread per output (fewer for huge outputs: grid stride)."""
    if total == 0:
        return
    blocks = min((total + THREADS - 1) // THREADS, MAX_BLOCKS)
    _kernel(name)((blocks,), (THREADS,), args)


def _split_rois(rois, dtype):
    """(K, 5) rois -> each RoI's image index (K,) float64 and its box (K, 4) in ``dtype``, both
    contiguous. The kernels cast the index to int64 as NumPy does (NaN -> INT64_MIN, no image);
    the corners are cast to the features' dtype, as in the array forms."""
    import cupy  # noqa: PLC0415 - only with CuPy

    rois = cupy.asarray(rois)
    image = cupy.ascontiguousarray(rois[:, 0].astype(cupy.float64))
    boxes = cupy.ascontiguousarray(rois[:, 1:].astype(dtype))
    return image, boxes


@dataclass
class RoIAlignKernelSaved:
    """What :func:`roi_align_backward` needs: the RoIs and settings, to walk the samples again."""

    shape: tuple[int, int, int, int]
    image: object  # (K,) float64 image indices
    boxes: object  # (K, 4) in the features' dtype
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool


def roi_align_forward(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign of CuPy ``features`` (N, C, H, W) at checked (K, 5) ``rois`` by the kernel.

    Arguments as ``roi_align.roi_align_forward`` (``output_size`` a pair; H, W > 0). Returns
    ``(out, saved)``: out (K, C, PH, PW), and what :func:`roi_align_backward` needs.
    """
    import cupy  # noqa: PLC0415 - only with CuPy

    features = cupy.ascontiguousarray(features)
    dtype = features.dtype
    N, C, H, W = features.shape
    PH, PW = output_size
    image, boxes = _split_rois(rois, dtype)
    out = cupy.empty((image.shape[0], C, PH, PW), dtype=dtype)
    saved = RoIAlignKernelSaved(
        features.shape, image, boxes, (PH, PW), spatial_scale, sampling_ratio, aligned
    )
    settings = _roi_align_settings(saved, dtype, out.size)
    _launch(
        f"roi_align_forward<{_SCALARS[dtype]}>", out.size, (features, image, boxes, *settings, out)
    )
    return out, saved


def roi_align_backward(grad_out, saved: RoIAlignKernelSaved):
    """The features' gradient (N, C, H, W) of the kernel's RoIAlign, by atomic adds.

    The samples are placed in the features' dtype, as in forward; ``grad_out`` is cast to it.
    """
    import cupy  # noqa: PLC0415 - only with CuPy

    dtype = saved.boxes.dtype
    grad_out = cupy.ascontiguousarray(grad_out.astype(dtype, copy=False))
    grad = cupy.zeros(saved.shape, dtype=dtype)
    settings = _roi_align_settings(saved, dtype, grad_out.size)
    args = (grad_out, saved.image, saved.boxes, *settings, grad)
    _launch(f"roi_align_backward<{_SCALARS[dtype]}>", grad_out.size, args)
    return grad


def _roi_align_settings(saved: RoIAlignKernelSaved, dtype, total: int) -> tuple:
    """The kernels' scalar arguments, from ``total`` to ``sampling_ratio``, typed for CUDA."""
    N, C, H, W = saved.shape
    PH, PW = saved.output_size
    offset = 0.5 if saved.aligned else 0.0
    ints = [np.int32(v) for v in (N, C, H, W, PH, PW)]
    scalars = [dtype.type(saved.spatial_scale), dtype.type(offset)]
    flags = [np.int32(saved.aligned), np.int32(saved.sampling_ratio)]
    return (np.int64(total), *ints, *scalars, *flags)


def roi_pool_forward(features, rois, output_size, spatial_scale):
    """RoIPool of CuPy ``features`` (N, C, H, W) at checked (K, 5) ``rois`` by the kernel.

    Arguments as ``roi_pool.roi_pool_forward`` (``output_size`` a pair; K, H, W > 0). Returns
    ``(out, argmax)``, each (K, C, PH, PW); argmax is the flat index of each max in the input,
    -1 for an empty bin, int32 when the input has fewer than 2^31 elements (int64 otherwise).
    """
    import cupy  # noqa: PLC0415 - only with CuPy

    features = cupy.ascontiguousarray(features)
    dtype = features.dtype
    N, C, H, W = features.shape
    PH, PW = output_size
    index = np.dtype(np.int32 if features.size < 2**31 else np.int64)  # as the array form
    image, boxes = _split_rois(rois, dtype)
    out = cupy.empty((image.shape[0], C, PH, PW), dtype=dtype)
    argmax = cupy.empty(out.shape, dtype=index)
    sizes = [np.int32(v) for v in (N, C, H, W, PH, PW)]
    args = (features, image, boxes, np.int64(out.size), *sizes, dtype.type(spatial_scale))
    _launch(
        f"roi_pool_forward<{_SCALARS[dtype]}, {_INDICES[index]}>", out.size, (*args, out, argmax)
    )
    return out, argmax


def roi_pool_backward(grad_out, argmax, shape):
    """The features' gradient (``shape``) of RoIPool: each output's gradient added at its argmax."""
    import cupy  # noqa: PLC0415 - only with CuPy

    grad_out = cupy.ascontiguousarray(grad_out)
    argmax = cupy.ascontiguousarray(argmax)
    dtype = grad_out.dtype
    grad = cupy.zeros(shape, dtype=dtype)
    name = f"roi_pool_backward<{_SCALARS[dtype]}, {_INDICES[argmax.dtype]}>"
    _launch(name, grad_out.size, (grad_out, argmax, np.int64(grad_out.size), grad))
    return grad
