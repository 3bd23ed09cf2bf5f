"""Build script of medkernels: Python packages plus the compiled extension medkernels._C.

Package metadata lives in pyproject.toml; this file decides what gets compiled.

Environment variables:
  MEDKERNELS_SKIP_EXT=1      install the pure-Python packages only (no medkernels._C).
  MEDKERNELS_BUILD_CUDA=0|1  force the CUDA kernels off or on.  Unset: on when torch is a
                             CUDA build and nvcc is found (CUDA_HOME, else /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST       CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX".  Unset: the
                             visible GPUs' architectures, or "8.0;9.0" when no GPU is visible.
  MEDKERNELS_CPU_OPT         optimisation of the C++ files (default -O3; -O1 builds in a fraction of the time,
                             for machines where the CPU kernels are tested but not timed).
  MEDKERNELS_SANITIZE        off when unset or empty (the default).  "address", "undefined" or "address,undefined":
                             compile and link the C++ files with gcc's -fsanitize=<value>, -g and frame pointers
                             (with undefined, also -fno-wrapv and UB made fatal); CPU kernels only.  With address,
                             the result loads only with libasan preloaded.  `make test-sanitize`
                             (tools/sanitize.sh) builds and tests it.
  MAX_JOBS                   parallel compile jobs (read by torch.utils.cpp_extension).

Install with `pip install --no-build-isolation .` (or `-e .`) so that the build uses the
torch already installed in the environment.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _env_switch(name):
    """None when `name` is unset or empty, else True for "1" and False for "0"."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value in ("0", "1"):
        return value == "1"
    sys.exit(f"error: {name} must be 0 or 1, got {value!r}")


def _packages():
    """`medkernels` and its subpackages, plus the top-level kernels/ folder as medkernels.kernels."""
    packages = find_packages(where=str(ROOT), include=["medkernels", "medkernels.*"])
    packages.append("medkernels.kernels")
    packages += ["medkernels.kernels." + name for name in find_packages(where=str(ROOT / "kernels"))]
    return packages


def _cuda_home():
    """The CUDA toolkit to build with (CUDA_HOME, defaulting to /usr/local/cuda), or None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not cuda_home and os.path.isdir(DEFAULT_CUDA_HOME):
        cuda_home = DEFAULT_CUDA_HOME
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    return cuda_home or None


def _nvcc(cuda_home):
    if not cuda_home:
        return None
    nvcc = Path(cuda_home, "bin", "nvcc")
    return str(nvcc) if nvcc.is_file() else None


def _want_cuda(torch):
    """Whether to compile the CUDA kernels; exits with a clear message when forced on but impossible."""
    forced = _env_switch("MEDKERNELS_BUILD_CUDA")
    if forced is False:
        return False
    cuda_home = _cuda_home()
    nvcc = _nvcc(cuda_home)
    if forced:
        if not torch.version.cuda:
            sys.exit(
                "error: MEDKERNELS_BUILD_CUDA=1 but the installed torch "
                f"{torch.__version__} is not a CUDA build"
            )
        if nvcc is None:
            sys.exit(
                "error: MEDKERNELS_BUILD_CUDA=1 but nvcc was not found "
                f"(looked in CUDA_HOME={cuda_home or '<unset>'}; set CUDA_HOME to a CUDA toolkit)"
            )
        return True
    return bool(torch.version.cuda) and nvcc is not None


def _cuda_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST, defaulting to the visible GPUs or, with none visible, 8.0;9.0."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return arch_list
    archs = []
    if torch.cuda.is_available():
        # Clamp to the newest architecture this torch was built for, as torch itself does.
        supported = [
            (int(a[3:]) // 10, int(a[3:]) % 10)
            for a in torch.cuda.get_arch_list()
            if a.startswith("sm_") and a[3:].isdigit()
        ]
        newest = max(supported) if supported else None
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            if newest is not None:
                capability = min(capability, newest)
            arch = f"{capability[0]}.{capability[1]}"
            if arch not in archs:
                archs.append(arch)
    if not archs:
        return DEFAULT_CUDA_ARCH_LIST
    archs.sort(key=lambda a: tuple(int(part) for part in a.split(".")))
    archs[-1] += "+PTX"
    return ";".join(archs)


def _nvidia_wheel_include_dirs(torch):
    """<site-packages>/nvidia/cuXX/include of the pip CUDA wheels (cusparse.h, cublas_v2.h, ...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for location in spec.submodule_search_locations:
        candidate = Path(location, f"cu{major}", "include")
        if major and candidate.is_dir():
            dirs.append(str(candidate))
    return dirs


def _compiler_accepts(flag):
    """Whether the C++ compiler used for extensions accepts `flag` (compiling and linking)."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    cxx = cxx.split()[0]
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.cpp")
        source.write_text("int main() { return 0; }\n")
        result = subprocess.run(
            [cxx, flag, str(source), "-o", str(Path(tmp, "probe"))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    return result.returncode == 0


def _c_string_macro(name, value):
    """-DNAME="value": a string-literal macro (json quoting is valid C for plain ASCII)."""
    return f"-D{name}={json.dumps(value)}"


def _sanitizer_flags():
    """(compile flags, link flags) asked for by MEDKERNELS_SANITIZE; ([], []) when it is unset or empty."""
    value = os.environ.get("MEDKERNELS_SANITIZE", "").strip()
    if not value:
        return [], []
    names = value.split(",")
    if not set(names) <= {"address", "undefined"} or len(set(names)) != len(names):
        sys.exit(f"error: MEDKERNELS_SANITIZE must be address, undefined or address,undefined, got {value!r}")
    sanitize = "-fsanitize=" + ",".join(names)
    # -g and frame pointers: the reports' stacks name file:line
    compile_flags = [sanitize, "-fno-omit-frame-pointer", "-g"]
    if "undefined" in names:
        # -fno-wrapv undoes Python's -fwrapv (in the CFLAGS setuptools compiles with), under which gcc drops the
        # signed-overflow check; -fno-sanitize-recover stops the process at the first report instead of going on
        compile_flags += ["-fno-wrapv", "-fno-sanitize-recover=undefined"]
    return compile_flags, [sanitize]


def _csrc_sources(pattern):
    """The files under csrc/ (recursively) matching `pattern`, as sorted paths relative to the project root."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob(pattern) if p.is_file())


def _extensions():
    if _env_switch("MEDKERNELS_SKIP_EXT"):
        return [], {}

    import torch

    with_cuda = _want_cuda(torch)
    from torch.utils import cpp_extension

    openmp = _compiler_accepts("-fopenmp")
    # MEDKERNELS_CPU_OPT=-O1 trades the C++ kernels' speed for build minutes (GPU sessions, where the CPU kernels
    # are only tested, never timed); build_info() reports the flags, so a slow build is visible
    cpu_opt = os.environ.get("MEDKERNELS_CPU_OPT", "-O3")
    if cpu_opt not in ("-O0", "-O1", "-O2", "-O3"):
        sys.exit(f"error: MEDKERNELS_CPU_OPT must be one of -O0 -O1 -O2 -O3, got {cpu_opt!r}")
    sanitizer_compile_flags, sanitizer_link_flags = _sanitizer_flags()
    if sanitizer_compile_flags and with_cuda:
        sys.exit("error: MEDKERNELS_SANITIZE builds the C++ CPU kernels only; set MEDKERNELS_BUILD_CUDA=0 as well")
    cxx_flags = [cpu_opt] + (["-fopenmp"] if openmp else []) + sanitizer_compile_flags
    nvcc_flags = ["-O3", "-lineinfo"]
    # every C++ file under csrc/ (bindings, CPU kernels, one folder per op family); the .cu files join them
    # for a CUDA build. Includes are written relative to csrc/ ("common/check_message.h"), the include dir.
    sources = _csrc_sources("*.cpp")
    define_macros = []
    arch_list = ""
    if with_cuda:
        arch_list = _cuda_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
        sources += _csrc_sources("*.cu")
        define_macros.append(("MEDKERNELS_WITH_CUDA", None))

    # Facts reported by medkernels._C.build_info(); only in the C++ flags, since
    # torch drops its own -gencode flags when an nvcc flag mentions "arch".
    build_facts = [
        _c_string_macro("MEDKERNELS_CXX_FLAGS", " ".join(cxx_flags)),
        _c_string_macro("MEDKERNELS_CUDA_ARCH_LIST", arch_list),
        _c_string_macro("MEDKERNELS_TORCH_VERSION", torch.__version__),
    ]
    extra_compile_args = {"cxx": cxx_flags + build_facts}
    if with_cuda:
        extra_compile_args["nvcc"] = nvcc_flags

    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_class(
        name="medkernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=(["-fopenmp"] if openmp else []) + sanitizer_link_flags,
    )
    if with_cuda:
        # After torch's own include dirs, so the toolkit's headers win where both have one.
        extension.include_dirs += _nvidia_wheel_include_dirs(torch)

    kind = f"C++ CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST={arch_list})" if with_cuda else "C++ CPU kernels"
    print(f"medkernels: building medkernels._C with {kind}; OpenMP: {openmp}", file=sys.stderr)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"medkernels.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
