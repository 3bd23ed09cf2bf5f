"""Test setup: Triton runs under its interpreter when there is no GPU (it must be set before triton
loads), and fixtures parametrize tests over the backends that can run on each device.

The tests mirror the ops: ops/ (each op against its reference on every backend, bad inputs, properties),
kernels/ (one backend's kernels), cross/ (suites across ops: autocast, compile, opcheck, DDP, memory,
determinism), models/ (the networks and modules), tools/ (build, benchmarks, training CLI); helpers/ holds
what they share, imported as ``helpers.<name>``."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def _gpu_present():
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import medkernels  # noqa: E402

CPU_BACKENDS = ("ref", "cpu", "triton")
CUDA_BACKENDS = ("ref", "cuda", "triton")


def _backend_params(device_type, names):
    params = []
    for name in names:
        marks = []
        if device_type == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA device"))
        params.append(pytest.param((device_type, name), id=f"{device_type}-{name}", marks=marks))
    return params


def _require(backend, device_type="cpu"):
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        # test_build.py::test_expected_backends_available fails loudly when a backend that must exist here is missing
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    if backend == "triton" and device_type == "cpu" and not medkernels._backend.triton_interpret():
        # with a GPU present the interpreter is off (it would also slow the GPU kernels down to a crawl)
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1; it runs on the GPU here (cuda-triton)")


@pytest.fixture(params=[p.values[0][1] for p in _backend_params("cpu", CPU_BACKENDS)], ids=lambda b: f"cpu-{b}")
def cpu_backend(request):
    """Name of each backend that runs on CPU tensors here."""
    _require(request.param)
    return request.param


@pytest.fixture(params=_backend_params("cpu", CPU_BACKENDS) + _backend_params("cuda", CUDA_BACKENDS))
def device_backend(request):
    """(device, backend) for every backend on every device present."""
    device_type, backend = request.param
    _require(backend, device_type)
    return torch.device(device_type), backend


_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=[pytest.param(("cpu", "cpu"), id="cpu"),
                        pytest.param(("cuda", "cuda"), id="cuda", marks=_NO_GPU),
                        pytest.param(("cuda", "triton"), id="cuda-triton", marks=_NO_GPU)])
def kernel_backend(request):
    """(device, backend) for each backend that runs compiled kernels: cpu and, with a GPU, cuda and triton (the
    Triton interpreter's launches have their own tests)."""
    device_type, backend = request.param
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    return torch.device(device_type), backend


@pytest.fixture(params=["avx2", "baseline"])
def capped_cpu_isa(request):
    """Runs the test with the C++ kernels held to a lower SIMD level than this CPU's best (set_cpu_isa_cap), so
    that every compiled variant is checked on one machine; restores the cap afterwards."""
    _require("cpu")
    from medkernels import _ext

    ext = _ext.module()
    before = ext.cpu_isa_cap()
    ext.set_cpu_isa_cap(request.param)
    try:
        yield request.param
    finally:
        ext.set_cpu_isa_cap(before)
