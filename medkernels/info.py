"""What medkernels can do on this machine: versions, backends (and why one is missing), gaps, build, devices."""
import importlib
import platform

import torch

from . import _backend, _ext


def _version(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def info():
    """A dict describing this installation; ``python -m medkernels info`` prints it."""
    from . import __version__, ops  # noqa: F401  (importing ops registers every op's table)

    backends = {}
    for name in _backend.BACKENDS:
        reason = _backend.unavailable_reason(name)
        backends[name] = {"available": reason is None, "reason": reason}
    devices = ["cpu"] + [
        f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
    ]
    return {
        "medkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "requested_backend": _backend.get_backend(),
        "backends": backends,
        "reference_fallbacks": _backend.gaps(),
        "build": _ext.build_info(),
        "cpu_isa_cap": _cpu_isa_cap(),
        "devices": devices,
    }


def _cpu_isa_cap():
    """The SIMD level the C++ CPU kernels are held to (MEDKERNELS_CPU_ISA / _C.set_cpu_isa_cap), None without
    the extension; a bad MEDKERNELS_CPU_ISA is reported rather than raised."""
    if not _ext.build_info():
        return None
    try:
        return _ext.module().cpu_isa_cap()
    except ValueError as exc:
        return f"invalid: {exc}"


def format_info(d):
    lines = [
        f"medkernels {d['medkernels']}",
        f"  python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda']}), triton {d['triton']}",
        f"  requested backend: {d['requested_backend']}",
        "backends:",
    ]
    for name, b in d["backends"].items():
        lines.append(f"  {name:7s} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
    lines.append("ops that run their reference (no kernel in that backend yet):")
    for name, ops in d["reference_fallbacks"].items():
        lines.append(f"  {name:7s} {', '.join(ops) if ops else '-'}")
    lines.append("build of medkernels._C:")
    if d["build"]:
        for key, value in sorted(d["build"].items()):
            lines.append(f"  {key}: {value}")
    else:
        lines.append("  not loaded")
    if d["cpu_isa_cap"] is not None:
        lines.append(f"CPU kernels' SIMD cap: {d['cpu_isa_cap']} "
                     "(each kernel uses the best level the CPU has within it)")
    lines.append("devices: " + ", ".join(d["devices"]))
    return "\n".join(lines) + "\n"
