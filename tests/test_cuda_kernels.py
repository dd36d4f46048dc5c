"""The CUDA kernels of RoIAlign and RoIPool (``minimask/ops/cuda_kernels.py``) against the array
forms, which are the reference.

Three ways to run the kernels, from the most faithful to the most available:

* **on a GPU** (``gpu`` marker, skipped without CuPy and a CUDA device): CuPy arrays through the
  ops' entry functions, which must take the kernel, compared with the array form on NumPy;
* **compiled by NVRTC** on the CPU, when its library is installed (the CUDA wheels of torch
  bring it): the source compiles, with every instantiation CuPy asks for, as CuPy compiles it;
* **emulated on the CPU** by a C++ compiler: the same source, with a few definitions that make a
  CUDA launch a loop over blocks and threads (atomicAdd a plain add), run through the module's
  own Python wrappers with NumPy standing in for CuPy. This checks the arithmetic, the edge
  cases, the arguments and the grid-stride loops; not NVRTC, the GPU's float units or atomics.

The same comparisons (:func:`check_roi_align`, :func:`check_roi_pool`) run on both executions.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_roi_align import cases as align_cases
from test_roi_align import poisoned_cases as poisoned_align_cases
from test_roi_pool import cases as pool_cases

import minimask.ops.roi_align as roi_align_module
from minimask.engine import Tensor
from minimask.ops import cuda_kernels
from minimask.ops.roi_align import roi_align, roi_align_backward, roi_align_forward
from minimask.ops.roi_pool import (
    RoIPoolSaved,
    roi_bins,
    roi_pool,
    roi_pool_backward,
    roi_pool_forward,
)

DTYPES = [np.float64, np.float32]
# (rtol, atol) of kernel vs array form: only the order of the sums differs
TOLERANCE = {np.dtype(np.float64): (1e-10, 1e-12), np.dtype(np.float32): (1e-4, 1e-5)}


# ---------------------------------------------------------------------------- the comparisons
def check_roi_align(case, dtype, run):
    """``run`` (the kernels) agrees with the array form on ``case``, forward and backward.

    ``run(features, rois, output_size, scale, sampling_ratio, aligned, grad)`` returns the
    output and the features' gradient as NumPy arrays.
    """
    features = case["features"].astype(dtype)
    options = [case[k] for k in ("rois", "output_size", "scale", "sampling_ratio", "aligned")]
    PH, PW = case["output_size"]
    grad = case["grad"][:, :, :PH, :PW].astype(dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in sums, as on the GPU
        out, saved = roi_align_forward(features, *options)
        grad_features = roi_align_backward(grad, saved)
        got_out, got_grad = run(features, *options, grad)
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    assert got_out.dtype == out.dtype and got_grad.dtype == grad_features.dtype
    np.testing.assert_allclose(got_out, out, rtol=rtol, atol=atol)  # NaN and inf in place
    np.testing.assert_allclose(got_grad, grad_features, rtol=rtol, atol=atol)


def check_roi_pool(case, dtype, run):
    """``run`` (the kernels) agrees with the array form on ``case``.

    ``run(features, rois, output_size, scale, grad)`` returns the output, the argmax and the
    kernel backward's gradient through that argmax, as NumPy arrays. The max is a value of the
    input, so the outputs are equal exactly; so is the argmax, except in bins of nothing but NaN,
    where the kernel's is the first NaN of the bin (row-major) and the array form's any NaN of it.
    """
    features = case["features"].astype(dtype)
    rois, output_size, scale = case["rois"], case["output_size"], case["scale"]
    grad = case["grad"].astype(dtype)
    out, saved = roi_pool_forward(features, rois, output_size, scale)
    got_out, got_argmax, got_grad = run(features, rois, output_size, scale, grad)
    np.testing.assert_array_equal(got_out, out)
    assert got_out.dtype == out.dtype and got_argmax.dtype == saved.argmax.dtype
    all_nan = np.isnan(out)
    np.testing.assert_array_equal(got_argmax[~all_nan], saved.argmax[~all_nan])
    if all_nan.any():
        flat = features.reshape(-1)
        assert np.isnan(flat[saved.argmax[all_nan]]).all()
        first_nan = first_nan_cells(features, rois, output_size, scale)
        np.testing.assert_array_equal(got_argmax[all_nan], first_nan[all_nan])
    # Backward: the array form scattering through the kernel's argmax (atomics: any order).
    expected = roi_pool_backward(grad, RoIPoolSaved(features.shape, got_argmax))
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(got_grad, expected, rtol=rtol, atol=atol)


def first_nan_cells(features, rois, output_size, scale):
    """For every output, the flat index of the first NaN of its bin in row-major order (-1 when
    it has none), from the array form's bin edges: the kernel's argmax of an all-NaN bin."""
    N, C, H, W = features.shape
    y0, y1, x0, x1 = roi_bins(rois, output_size, scale, (H, W), features.dtype)
    first = np.full((len(rois), C) + tuple(output_size), -1, dtype=np.int64)
    for k, n in enumerate(rois[:, 0].astype(np.int64)):
        for ph in range(output_size[0]):
            for pw in range(output_size[1]):
                window = features[n, :, y0[k, ph] : y1[k, ph], x0[k, pw] : x1[k, pw]]
                for c in range(C):
                    cells = np.flatnonzero(np.isnan(window[c]))  # row-major within the bin
                    if cells.size:
                        y, x = np.unravel_index(cells[0], window[c].shape)
                        first[k, c, ph, pw] = ((n * C + c) * H + y0[k, ph] + y) * W + x0[k, pw] + x
    return first


@st.composite
def pool_cases_with_nan(draw):
    """RoIPool cases whose maps hold NaN, ±inf and whole NaN patches (bins of nothing but NaN)."""
    case = draw(pool_cases(ties=draw(st.booleans())))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    features = case["features"].copy()
    where = rng.random(features.shape) < draw(st.sampled_from([0.05, 0.3]))
    features[where] = rng.choice([np.nan, np.inf, -np.inf], int(where.sum()))
    N, C, H, W = features.shape
    y, x = rng.integers(0, H), rng.integers(0, W)
    features[rng.integers(0, N), rng.integers(0, C), y : y + 3, x : x + 3] = np.nan
    return dict(case, features=features)


def edge_rois(H, W):
    """RoIs at the edges of the rules, in image pixels for a map of H×W cells at scale 1/2.

    The last is for RoIPool only: RoIAlign's adaptive grid would give it 2^59 samples per bin.
    The huge ones (1e30) do fit in float32.
    """
    big, nan, inf = 1e30, np.nan, np.inf
    return np.array([
        [0, 2.0, 2.0, 2.0, 2.0],  # zero size
        [0, 5.0, 6.0, 1.0, 2.0],  # inverted
        [1, -40.0, -40.0, -10.0, -12.0],  # fully outside, before the map
        [0, 2 * W + 10, 0.0, 2 * W + 30, 2 * H],  # fully outside, after it
        [1, -3.0, -1.0, 2 * W + 4, 2 * H + 3],  # larger than the map
        [0, 1.0, 1.0, 2.5, 4.5],  # halves: C's rounding
        [1, -1.0, -3.0, -0.5, 0.5],  # around 0, negative halves
        [0, nan, 1.0, 4.0, 4.0],  # non-finite corners: int64 casts give INT64_MIN
        [1, 1.0, -inf, 4.0, inf],
        [0, -big, -big, big, big],  # huge corners: they do not fit in int64 either
        [1, 0.0, 0.0, 2.0**62, 3.0],  # fits in int64, its bins do not (RoIPool only, see above)
    ])  # fmt: skip


# ---------------------------------------------------------------------------- the CPU checks
def test_the_source_holds_every_kernel_and_instantiation():
    for kernel in ("roi_align_forward", "roi_align_backward", "roi_pool_forward",
                   "roi_pool_backward"):  # fmt: skip
        assert re.search(rf"__global__ void {kernel}\(", cuda_kernels.CUDA_SOURCE)
    assert len(cuda_kernels.KERNEL_NAMES) == 12  # 2 RoIAlign × 2 dtypes + 2 RoIPool × 2 × 2
    assert "--fmad=false" in cuda_kernels.COMPILE_OPTIONS  # products rounded as on the CPU


def test_numpy_input_never_takes_the_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched for NumPy input")

    for name in ("_launch", "_kernel", "roi_align_forward", "roi_align_backward",
                 "roi_pool_forward", "roi_pool_backward"):  # fmt: skip
        monkeypatch.setattr(cuda_kernels, name, refuse)
    rng = np.random.default_rng(0)
    rois = np.array([[0, 1.0, 1.0, 9.0, 7.0], [1, 0.0, 2.0, 5.0, 5.0]])
    for op in (roi_align, roi_pool):
        x = Tensor(rng.standard_normal((2, 3, 6, 6)), requires_grad=True)
        op(x, rois, 2, 0.5).sum().backward()
        assert isinstance(x.grad, np.ndarray) and x.grad.any()
    assert not cuda_kernels.use_kernel(np.zeros(3))


def test_only_a_real_cupy_array_takes_the_kernels(monkeypatch):
    # An array whose type comes from a module named cupy..., as CuPy's do.
    fake_array = type("ndarray", (), {"__module__": "cupy._core.core"})()
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace())  # a stand-in: no RawModule
    assert not cuda_kernels.use_kernel(fake_array)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=object))
    assert cuda_kernels.use_kernel(fake_array)
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    assert not cuda_kernels.use_kernel(fake_array)


# ---------------------------------------------------------------------------- NVRTC on the CPU
def find_nvrtc():
    """The NVRTC library (CUDA's runtime compiler, the one CuPy uses), or None."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")  # the CUDA wheels that torch installs
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True))
    found = ctypes.util.find_library("nvrtc")
    candidates += [found] if found else []
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
            with contextlib.suppress(OSError):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC loads it by name
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    return None


def test_the_source_compiles_with_nvrtc():
    nvrtc = find_nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC is not installed (it comes with CuPy's or torch's CUDA wheels)")
    program = ctypes.c_void_p()
    source = cuda_kernels.CUDA_SOURCE.encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"roi.cu", 0, None, None) == 0
    for name in cuda_kernels.KERNEL_NAMES:  # CuPy's name_expressions
        assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0
    # The oldest architecture this NVRTC knows with atomicAdd on doubles (6.0 and newer).
    count = ctypes.c_int()
    assert nvrtc.nvrtcGetNumSupportedArchs(ctypes.byref(count)) == 0
    archs = (ctypes.c_int * count.value)()
    assert nvrtc.nvrtcGetSupportedArchs(archs) == 0
    arch = min(a for a in archs if a >= 60)
    options = [o.encode() for o in cuda_kernels.COMPILE_OPTIONS]
    options.append(f"-arch=compute_{arch}".encode())
    array = (ctypes.c_char_p * len(options))(*options)
    status = nvrtc.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()
    assert "warning" not in log.value.decode(), log.value.decode()
    for name in cuda_kernels.KERNEL_NAMES:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0
        assert lowered.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


# ---------------------------------------------------------------------------- CPU emulation
# What a C++ compiler needs to build the CUDA source for the CPU: the qualifiers mean nothing,
# the math functions are <cmath>'s, atomicAdd is a plain add (one thread runs at a time), and
# the launch is a loop over (block, thread) with a small grid, so that every thread takes several
# outputs through its grid-stride loop.
EMULATION_PRELUDE = r"""
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
using std::ceil; using std::fabs; using std::floor; using std::isfinite; using std::isnan;
struct Dim { unsigned x; };
static Dim threadIdx, blockIdx, blockDim = {3}, gridDim = {2};
template <typename T> T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
typedef long long longlong;
#define LAUNCH(call) \
  for (blockIdx.x = 0; blockIdx.x < gridDim.x; blockIdx.x++) \
    for (threadIdx.x = 0; threadIdx.x < blockDim.x; threadIdx.x++) call
"""
EMULATION_LAUNCHERS = r"""
#define ALIGN(name, T) extern "C" void name##_##T(const T* a, const double* image, const T* boxes, \
    long long total, int N, int C, int H, int W, int PH, int PW, T scale, T offset, int aligned, \
    int sampling_ratio, T* b) { LAUNCH((name<T>(a, image, boxes, total, N, C, H, W, PH, PW, \
    scale, offset, aligned, sampling_ratio, b))); }
#define POOL(T, I) \
  extern "C" void roi_pool_forward_##T##_##I(const T* features, const double* image, \
      const T* boxes, long long total, int N, int C, int H, int W, int PH, int PW, T scale, \
      T* out, I* argmax) { LAUNCH((roi_pool_forward<T, I>(features, image, boxes, total, N, C, \
      H, W, PH, PW, scale, out, argmax))); } \
  extern "C" void roi_pool_backward_##T##_##I(const T* grad_out, const I* argmax, \
      long long total, T* grad) { LAUNCH((roi_pool_backward<T, I>(grad_out, argmax, total, \
      grad))); }
ALIGN(roi_align_forward, float) ALIGN(roi_align_forward, double)
ALIGN(roi_align_backward, float) ALIGN(roi_align_backward, double)
POOL(float, int) POOL(float, longlong) POOL(double, int) POOL(double, longlong)
"""


@functools.lru_cache(maxsize=1)
def emulation_library():
    """The kernels built for the CPU (a shared library), or None without a C++ compiler."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None
    folder = tempfile.mkdtemp(prefix="minimask-kernels-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # once loaded, the file can go
    source = os.path.join(folder, "kernels.cpp")
    with open(source, "w") as f:
        f.write(EMULATION_PRELUDE + cuda_kernels.CUDA_SOURCE + EMULATION_LAUNCHERS)
    library = os.path.join(folder, "kernels.so")
    # -ffp-contract=off: no fused multiply-add, as --fmad=false on the GPU
    command = [compiler, "-std=c++14", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
               "-Wall", "-Werror", source, "-o", library]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(library)


def _c_argument(value):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return ctypes.c_void_p(value.ctypes.data)
    c_types = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
               np.float32: ctypes.c_float, np.float64: ctypes.c_double}  # fmt: skip
    return c_types[type(value)](value)


def emulated_kernel(name):
    """A callable launched as a CuPy kernel, ``kernel(grid, block, args)``, that runs the
    emulated kernel ``name`` (``roi_pool_forward<float, long long>``...) on NumPy arrays."""
    symbol = re.sub(r"\W+", "_", name.replace("long long", "longlong")).strip("_")
    function = getattr(emulation_library(), symbol)

    def launch(grid, block, args):
        function(*[_c_argument(a) for a in args])

    return launch


# The part of CuPy that the kernels' wrappers use, from NumPy.
NUMPY_AS_CUPY = types.SimpleNamespace(
    asarray=np.asarray, ascontiguousarray=np.ascontiguousarray, empty=np.empty,
    zeros=np.zeros, float64=np.float64,
)  # fmt: skip


@contextlib.contextmanager
def emulated():
    """cuda_kernels' wrappers on NumPy arrays, launching the emulated kernels."""
    if emulation_library() is None:
        pytest.skip("no C++ compiler to build the kernels for the CPU")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "cupy", NUMPY_AS_CUPY)
        patch.setattr(cuda_kernels, "_kernel", emulated_kernel)
        yield


def align_by_emulation(features, rois, output_size, scale, sampling_ratio, aligned, grad):
    with emulated():
        out, saved = cuda_kernels.roi_align_forward(
            features, rois, output_size, scale, sampling_ratio, aligned
        )
        return out, cuda_kernels.roi_align_backward(grad, saved)


def pool_by_emulation(features, rois, output_size, scale, grad):
    if len(rois) == 0:  # the entry function answers an empty list before any kernel
        out, saved = roi_pool_forward(features, rois, output_size, scale)
        return out, saved.argmax, roi_pool_backward(grad, saved)
    with emulated():
        out, argmax = cuda_kernels.roi_pool_forward(features, rois, output_size, scale)
        return out, argmax, cuda_kernels.roi_pool_backward(grad, argmax, features.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30)
@given(case=align_cases())
def test_emulated_roi_align_equals_the_array_form(case, dtype):
    check_roi_align(case, dtype, align_by_emulation)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30)
@given(case=poisoned_align_cases())
def test_emulated_roi_align_nan_and_inf_reach_the_same_bins(case, dtype):
    check_roi_align(case, dtype, align_by_emulation)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30)
@given(case=pool_cases(ties=True))
def test_emulated_roi_pool_equals_the_array_form_ties_included(case, dtype):
    check_roi_pool(case, dtype, pool_by_emulation)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30)
@given(case=pool_cases_with_nan())
def test_emulated_roi_pool_skips_nan_as_the_array_form(case, dtype):
    check_roi_pool(case, dtype, pool_by_emulation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernels_at_the_edges(dtype):
    check_edges(dtype, align_by_emulation, pool_by_emulation)


def check_edges(dtype, align, pool):
    """Both ops on :func:`edge_rois`, the empty RoI list, and float64 values below -FLT_MAX."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 3, 7, 9))
    features[1, 2, 2:5, 3:6] = np.nan
    rois = edge_rois(7, 9)
    finite = rois[np.isfinite(rois).all(axis=1)][:-1]  # RoIAlign's array form: see below
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's casts of NaN and huge values
        for sampling_ratio, aligned in [(-1, False), (-1, True), (2, False), (0, True)]:
            for some in (finite, rois[:0]):
                case = dict(features=features, rois=some, output_size=(3, 4), scale=0.5,
                            sampling_ratio=sampling_ratio, aligned=aligned,
                            grad=rng.standard_normal((len(some), 3, 3, 4)))  # fmt: skip
                check_roi_align(case, dtype, align)
            # A RoI with a NaN or infinite corner has its samples nowhere: 0, and no gradient.
            # (The array form raises there, from a negative index of its weight matrices.)
            some = rois[~np.isfinite(rois).all(axis=1)]
            grad = np.ones((len(some), 3, 3, 4), dtype=dtype)
            out, grad_features = align(features.astype(dtype), some, (3, 4), 0.5, sampling_ratio,
                                       aligned, grad)  # fmt: skip
            np.testing.assert_array_equal(out, 0)
            np.testing.assert_array_equal(grad_features, 0)
        for some in (rois, rois[:0]):
            case = dict(features=features, rois=some, output_size=(3, 4), scale=0.5,
                        grad=rng.standard_normal((len(some), 3, 3, 4)))  # fmt: skip
            check_roi_pool(case, dtype, pool)
    # A NaN image index passes check_rois and is no image after the int64 cast: 0, no gradient.
    # (The array forms leave such outputs unset.)
    no_image = np.array([[np.nan, 1.0, 1.0, 8.0, 8.0]])
    grad = np.ones((1, 3, 3, 4), dtype=dtype)
    out, grad_features = align(features.astype(dtype), no_image, (3, 4), 0.5, 2, False, grad)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(grad_features, 0)
    out, argmax, grad_features = pool(features.astype(dtype), no_image, (3, 4), 0.5, grad)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(argmax, -1)
    np.testing.assert_array_equal(grad_features, 0)
    if dtype == np.float64:  # below -FLT_MAX: the true max, as the array form (not torchvision)
        case = dict(features=np.array([[-3e300, -1e300], [-2e300, -5e300]]).reshape(1, 1, 2, 2),
                    rois=np.array([[0, 0.0, 0.0, 1.0, 1.0]]), output_size=(1, 1), scale=1.0,
                    grad=np.ones((1, 1, 1, 1)))  # fmt: skip
        check_roi_pool(case, dtype, pool)


# ---------------------------------------------------------------------------- on a GPU
def align_on_gpu(features, rois, output_size, scale, sampling_ratio, aligned, grad):
    """The ops' entry functions on CuPy arrays: they must run the kernels."""
    import cupy  # noqa: PLC0415 - only with a GPU

    out, saved = roi_align_forward(
        cupy.asarray(features), cupy.asarray(rois), output_size, scale, sampling_ratio, aligned
    )
    assert isinstance(out, cupy.ndarray)
    assert isinstance(saved, cuda_kernels.RoIAlignKernelSaved)
    return out.get(), roi_align_backward(cupy.asarray(grad), saved).get()


def pool_on_gpu(features, rois, output_size, scale, grad):
    import cupy  # noqa: PLC0415 - only with a GPU

    launched = []
    with pytest.MonkeyPatch.context() as patch:  # count the launches: the kernels must run
        launch = cuda_kernels._launch
        patch.setattr(cuda_kernels, "_launch", lambda *a: launched.append(a[0]) or launch(*a))
        out, saved = roi_pool_forward(
            cupy.asarray(features), cupy.asarray(rois), output_size, scale
        )
        grad_features = roi_pool_backward(cupy.asarray(grad), saved)
    if len(rois):
        assert [name.split("<")[0] for name in launched] == [
            "roi_pool_forward",
            "roi_pool_backward",
        ]
    return out.get(), saved.argmax.get(), grad_features.get()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40)
@given(case=align_cases())
def test_gpu_roi_align_equals_the_array_form(case, dtype):
    check_roi_align(case, dtype, align_on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40)
@given(case=poisoned_align_cases())
def test_gpu_roi_align_nan_and_inf_reach_the_same_bins(case, dtype):
    check_roi_align(case, dtype, align_on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40)
@given(case=pool_cases(ties=True))
def test_gpu_roi_pool_equals_the_array_form_ties_included(case, dtype):
    check_roi_pool(case, dtype, pool_on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40)
@given(case=pool_cases_with_nan())
def test_gpu_roi_pool_skips_nan_as_the_array_form(case, dtype):
    check_roi_pool(case, dtype, pool_on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_at_the_edges(dtype):
    check_edges(dtype, align_on_gpu, pool_on_gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_at_a_realistic_size(dtype):
    # Many threads per block and blocks per grid, a stride-16 map and proposal-like boxes.
    from minimask.bench.roi_cases import proposal_rois  # noqa: PLC0415

    rng = np.random.default_rng(0)
    rois = proposal_rois(300, rng, image=400, num_images=2)
    features = rng.standard_normal((2, 16, 25, 25))
    for sampling_ratio, aligned in [(2, False), (-1, True)]:
        case = dict(features=features, rois=rois, output_size=(7, 7), scale=1 / 16,
                    sampling_ratio=sampling_ratio, aligned=aligned,
                    grad=rng.standard_normal((300, 16, 7, 7)))  # fmt: skip
        check_roi_align(case, dtype, align_on_gpu)
    case = dict(features=rng.permutation(features.size).reshape(features.shape) * 1.0,
                rois=rois, output_size=(7, 7), scale=1 / 16,
                grad=rng.standard_normal((300, 16, 7, 7)))  # fmt: skip
    check_roi_pool(case, dtype, pool_on_gpu)


@pytest.mark.gpu
def test_gpu_array_forms_still_equal_the_kernels():
    # The array forms run on CuPy too when the kernels are switched off: they must agree, so that
    # either can stand for the other (and the shared/own windows keep a GPU check).
    import cupy  # noqa: PLC0415 - only with a GPU

    rng = np.random.default_rng(1)
    features = cupy.asarray(rng.standard_normal((2, 8, 40, 50)))
    xy = rng.uniform(-20, 200, (300, 2))
    rois = np.concatenate([rng.integers(0, 2, (300, 1)), xy, xy + rng.uniform(0, 120, (300, 2))], 1)
    rois = cupy.asarray(rois)
    grad = cupy.asarray(rng.standard_normal((300, 8, 7, 7)))
    for own_value_cost in (10**9, -(10**9)):  # shared windows, then own windows
        results = []
        for enabled in (True, False):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(cuda_kernels, "ENABLED", enabled)
                patch.setattr(roi_align_module, "OWN_VALUE_COST", own_value_cost)
                out, saved = roi_align_forward(features, rois, 7, 0.25, -1, True)
                results.append((out, roi_align_backward(grad, saved)))
                out, saved = roi_pool_forward(features, rois, 7, 0.25)
                results.append((out, roi_pool_backward(grad, saved), saved.argmax))
        for kernel, array_form in zip(results[:2], results[2:]):
            for a, b in zip(kernel, array_form):
                np.testing.assert_allclose(a.get(), b.get(), rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_gpu_tensor_ops_run_the_kernels(monkeypatch):
    # The engine ops (what the model calls) take the kernels on CuPy, forward and backward.
    import cupy  # noqa: PLC0415 - only with a GPU

    launched = []
    launch = cuda_kernels._launch
    monkeypatch.setattr(cuda_kernels, "_launch", lambda *a: launched.append(a[0]) or launch(*a))
    rng = np.random.default_rng(0)
    rois = cupy.asarray([[0, 1.0, 1.0, 9.0, 7.0], [1, 0.0, 2.0, 5.0, 5.0]])
    for op in (roi_align, roi_pool):
        x = Tensor(cupy.asarray(rng.standard_normal((2, 3, 6, 6))), requires_grad=True)
        op(x, rois, 2, 0.5).sum().backward()
    assert [name.split("<")[0] for name in launched] == [
        "roi_align_forward",
        "roi_align_backward",
        "roi_pool_forward",
        "roi_pool_backward",
    ]
