"""Backend selection: use_backend / set_backend / MEDKERNELS_BACKEND, errors for unavailable backends,
auto's choice and fallback, and `python -m medkernels info`."""
import os
import subprocess
import sys

import pytest
import torch

import medkernels
from medkernels import _backend
from medkernels.ops.cross_scan import CROSS_SCAN


def test_use_backend_nests_and_restores():
    before = medkernels.get_backend()
    with medkernels.use_backend("ref"):
        assert medkernels.get_backend() == "ref"
        with medkernels.use_backend("auto"):
            assert medkernels.get_backend() == "auto"
        assert medkernels.get_backend() == "ref"
    assert medkernels.get_backend() == before


def test_set_backend_and_env_var(monkeypatch):
    monkeypatch.setattr(_backend, "_default", None)
    monkeypatch.setenv("MEDKERNELS_BACKEND", "ref")
    assert medkernels.get_backend() == "ref"
    medkernels.set_backend("auto")
    assert medkernels.get_backend() == "auto"
    with medkernels.use_backend("ref"):
        assert medkernels.get_backend() == "ref"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        medkernels.set_backend("fortran")


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: None if name == "ref" else f"{name} is off in this test")
    with pytest.raises(medkernels.BackendUnavailableError, match="cuda is off in this test"):
        with medkernels.use_backend("cuda"):
            pass
    with pytest.raises(medkernels.BackendUnavailableError, match="cpu is off"):
        medkernels.set_backend("cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: None if name == "ref" else "switched off")
    monkeypatch.setattr(_backend, "_warned", set())
    with medkernels.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="'cpu' backend is unavailable"):
            assert _backend.resolve(CROSS_SCAN, torch.device("cpu")) == "ref"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.resolve(CROSS_SCAN, torch.device("cpu")) == "ref"


def test_auto_prefers_compiled_cpu_backend_on_cpu():
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("cpu backend not built")
    with medkernels.use_backend("auto"):
        assert _backend.resolve(CROSS_SCAN, torch.device("cpu")) == "cpu"


def test_backend_on_wrong_device_is_refused(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: None)
    with medkernels.use_backend("cuda"):
        with pytest.raises(ValueError, match="cannot run op 'cross_scan' on cpu tensors"):
            _backend.resolve(CROSS_SCAN, torch.device("cpu"))


def test_missing_op_runs_reference_and_is_listed():
    table = _backend.OpTable("only_ref_for_test", ref=lambda: "ref")
    try:
        for backend in medkernels.available_backends():
            if _backend._runs_on(backend, "cpu"):
                with medkernels.use_backend(backend):
                    assert _backend.resolve(table, torch.device("cpu")) == "ref"
        assert all("only_ref_for_test" in ops for ops in _backend.gaps().values())
    finally:
        del _backend.OPS["only_ref_for_test"]


def test_info_reports_backends_and_gaps():
    d = medkernels.info()
    assert set(d["backends"]) == set(medkernels.BACKENDS)
    assert d["backends"]["ref"] == {"available": True, "reason": None}
    for name, b in d["backends"].items():
        assert b["available"] or b["reason"]
    for backend, missing in d["reference_fallbacks"].items():
        assert missing == sorted(n for n, t in _backend.OPS.items() if not t.implemented_in(backend))
    assert "depthwise_conv2d" not in d["reference_fallbacks"]["cpu"]
    assert "cross_scan" not in d["reference_fallbacks"]["cpu"]
    assert d["cpu_isa_cap"] in (None, "avx512", "avx2", "baseline")


def test_bad_cpu_isa_cap_is_a_clear_error():
    # a typo in MEDKERNELS_CPU_ISA makes the CPU kernels raise (never silently run another level); info reports it
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("no C++ extension")
    code = ("import torch, medkernels\n"
            "from medkernels import _ext\n"
            "assert medkernels.info()['cpu_isa_cap'].startswith('invalid: MEDKERNELS_CPU_ISA')\n"
            "try:\n"
            "    _ext.module().depthwise_conv2d_fwd_cpu(torch.zeros(1, 2, 4, 4), torch.zeros(2, 1, 3, 3), None, 1, 1,"
            " 'silu', False)\n"
            "except ValueError as e:\n"
            "    assert 'avx512' in str(e) and 'sse9' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    env = dict(os.environ, MEDKERNELS_CPU_ISA="sse9")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr


def test_info_command_runs():
    res = subprocess.run([sys.executable, "-m", "medkernels", "info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for word in ("torch", "triton", "backends:", "ref", "cpu", "cuda", "build of medkernels._C", "devices:"):
        assert word in res.stdout


def test_missing_extension_warns_once_and_falls_back():
    # Block medkernels._C in a fresh interpreter: the package must import, say why once, and keep working.
    code = """
import sys, warnings
sys.modules["medkernels._C"] = None
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, medkernels
    from medkernels.ops import cross_scan, cross_merge
    x = torch.randn(2, 3, 4, 5)
    y = cross_scan(x)
    cross_merge(y.reshape(2, 4, 3, 4, 5))
    cross_scan(x)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert sum(m.startswith("medkernels._C could not be loaded") for m in messages) == 1, messages
assert sum(m.startswith("medkernels: the 'cpu' backend is unavailable") for m in messages) == 1, messages
assert len(messages) == 2, messages
assert torch.equal(y[:, 2], x.reshape(2, 3, 20).flip(-1))
try:
    medkernels.set_backend("cpu")
except medkernels.BackendUnavailableError as exc:
    assert "could not be loaded" in str(exc)
else:
    raise AssertionError("set_backend('cpu') should fail without the extension")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_auto_runs_pytorch_where_the_kernels_measured_slower(monkeypatch):
    # the depthwise kernels lost to cuDNN on an H100 (benchmarks/results/archive/nvidia-h100-80gb-hbm3-depthwise.txt):
    # auto takes the reference on CUDA tensors, an explicit request still gets its kernels, CPU is unchanged
    from medkernels.ops.depthwise_conv2d import DEPTHWISE_CONV2D
    from medkernels.ops.depthwise_conv2d_layernorm import DEPTHWISE_CONV2D_LAYERNORM

    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: None)
    for table in (DEPTHWISE_CONV2D, DEPTHWISE_CONV2D_LAYERNORM):
        with medkernels.use_backend("auto"):
            assert _backend.resolve(table, torch.device("cuda")) == "ref"
            assert _backend.resolve(table, torch.device("cpu")) == "cpu"
        with medkernels.use_backend("cuda"):
            assert _backend.resolve(table, torch.device("cuda")) == "cuda"
    with medkernels.use_backend("auto"):
        assert _backend.resolve(CROSS_SCAN, torch.device("cuda")) == "cuda"


def test_eager_reference_depthwise_is_plain_pytorch_autograd():
    # on the reference backend, eager calls skip the custom op: the graph holds PyTorch's own backward nodes
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, requires_grad=True)
    with medkernels.use_backend("ref"):
        y = medkernels.ops.depthwise_conv2d(x, w, None, activation="silu")
    assert "medkernels" not in type(y.grad_fn).__name__.lower() and "Silu" in type(y.grad_fn).__name__
    expected = torch.nn.functional.silu(torch.nn.functional.conv2d(x, w, None, 1, 1, groups=3))
    torch.testing.assert_close(y, expected)
