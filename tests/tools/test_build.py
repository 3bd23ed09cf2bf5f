"""The build and the installation: medkernels._C, build_info(), the kernels subpackage, the backends."""
import importlib
import importlib.metadata
import sysconfig
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medkernels

REPO_ROOT = Path(__file__).resolve().parents[2]

BUILD_INFO_TYPES = {
    "cuda": bool,
    "cuda_version": str,
    "cuda_arch_list": str,
    "openmp": bool,
    "compiler": str,
    "cxx_flags": str,
    "torch_version_at_build": str,
}
CUDA_ENTRY_POINTS = ("cross_scan_cuda", "cross_merge_cuda")
CPU_ENTRY_POINTS = ("cross_scan_cpu", "cross_merge_cpu", "cross_scan_indices", "build_info")


@pytest.fixture(scope="module")
def ext():
    return importlib.import_module("medkernels._C")


@pytest.fixture(scope="module")
def build_info(ext):
    return ext.build_info()


def test_extension_imports(ext):
    assert ext.__name__ == "medkernels._C"
    assert Path(ext.__file__).parent == Path(medkernels.__file__).parent
    for name in CPU_ENTRY_POINTS:
        assert callable(getattr(ext, name)), name


def test_build_info_keys_and_types(build_info):
    assert isinstance(build_info, dict)
    assert set(build_info) == set(BUILD_INFO_TYPES)
    for key, expected_type in BUILD_INFO_TYPES.items():
        assert isinstance(build_info[key], expected_type), (key, build_info[key])


def test_build_info_is_consistent(build_info):
    # Built against the torch that is installed now (a mismatch means: rebuild).
    assert build_info["torch_version_at_build"] == torch.__version__
    assert build_info["compiler"]
    # -O3 unless the build asked for less (MEDKERNELS_CPU_OPT, used for quick builds on GPU machines)
    assert os.environ.get("MEDKERNELS_CPU_OPT", "-O3") in build_info["cxx_flags"].split()
    assert ("-fopenmp" in build_info["cxx_flags"].split()) == build_info["openmp"]
    if build_info["cuda"]:
        major, minor = build_info["cuda_version"].split(".")
        assert major.isdigit() and minor.isdigit()
        assert build_info["cuda_arch_list"]
    else:
        assert build_info["cuda_version"] == ""
        assert build_info["cuda_arch_list"] == ""


def test_cuda_entry_points_exist_iff_built_with_cuda(ext, build_info):
    for name in CUDA_ENTRY_POINTS:
        assert hasattr(ext, name) == build_info["cuda"], name


def test_cuda_kernels_built_when_toolkit_present(build_info):
    # The Makefile builds with /usr/local/cuda when it is there: a CUDA-enabled torch plus nvcc must give CUDA kernels,
    # unless the builder turned them off on purpose.
    nvcc = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    if os.environ.get("MEDKERNELS_BUILD_CUDA") == "0" or not torch.version.cuda or not nvcc.is_file():
        pytest.skip("no CUDA toolkit, a CPU-only torch, or MEDKERNELS_BUILD_CUDA=0")
    assert build_info["cuda"], "nvcc and a CUDA torch are present but medkernels._C has no CUDA kernels"


def test_kernels_package_is_a_subpackage():
    package = importlib.import_module("medkernels.kernels")
    location = Path(package.__file__).resolve()
    editable = location == REPO_ROOT / "kernels" / "__init__.py"  # pip install -e: the source folder
    regular = location.parent.name == "kernels" and location.parent.parent.name == "medkernels"  # pip install .
    assert editable or regular, location


def test_cross_scan_kernels_importable():
    pytest.importorskip("triton")
    module = importlib.import_module("medkernels.kernels.cross_scan")
    assert callable(module.cross_scan_fwd)
    assert callable(module.cross_merge_fwd)


def _distribution():
    # Look in site-packages only: from the repo root, a stray medkernels.egg-info in the working tree
    # would otherwise be found first.
    site = sysconfig.get_paths()["purelib"]
    found = list(importlib.metadata.distributions(name="medkernels", path=[site]))
    if not found:
        pytest.skip("medkernels is not installed as a distribution (running from a source tree)")
    return found[0]


def test_distribution_has_no_top_level_kernels_package():
    dist = _distribution()
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        names = set(top_level.split())
        assert "kernels" not in names, names
        assert "medkernels" in names, names
    for file in dist.files or ():
        parts = Path(str(file)).parts
        assert not (parts and parts[0] == "kernels"), f"top-level kernels/ installed: {file}"


def test_imports_from_outside_the_repo(tmp_path):
    # From another directory (so ./kernels is not on sys.path): medkernels.kernels.cross_scan is found
    # through the installation, and no top-level `kernels` package is.
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "import medkernels._C\n"
        "import medkernels.kernels\n"
        "try:\n"
        "    import triton\n"
        "except ImportError:\n"
        "    sys.exit(0)\n"
        "import medkernels.kernels.cross_scan as m\n"
        "print(m.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("", "medkernels.kernels.cross_scan")


def _triton_importable():
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def test_expected_backends_available(build_info):
    # The backends that must work on this machine; the op tests skip unavailable ones, so a missing one fails here.
    expected = ["ref", "cpu"]
    if build_info["cuda"] and torch.cuda.is_available():
        expected.append("cuda")
    if _triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        expected.append("triton")
    missing = {name: medkernels.unavailable_reason(name) for name in expected}
    missing = {name: reason for name, reason in missing.items() if reason is not None}
    assert not missing, missing
