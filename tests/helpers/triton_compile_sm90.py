"""Compiles every Triton kernel of medkernels.kernels, forward and backward, for a named GPU target (sm_90 by
default) with the installed Triton, on a machine without a GPU.

The launchers run on CPU tensors of representative HiFuse / MedMamba shapes inside
``kernels._utils.record_launches(run=False)``: nothing is launched, and each launch's arguments and constexprs
(the GPU's tile sizes, since the interpreter is off) are recorded. Each distinct specialization, with the
argument types and divisibility attributes a GPU launch would give it, then goes through ``triton.compile``'s
whole pipeline down to a cubin (ptxas included), so a kernel that fails to lower fails here with its name.

Run with TRITON_INTERPRET unset:  python tests/helpers/triton_compile_sm90.py [--arch 90] [--jobs 2]
Prints one line per failure and a summary; exit status 0 all compiled, 1 a failure, 2 when this Triton's
compile API is not the one this script knows (3.3 and later: ASTSource with constexprs)."""
import argparse
import concurrent.futures
import importlib
import inspect
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
import traceback

import torch

KERNEL_MODULES = ("cross_scan", "selective_scan", "ss2d_scan", "depthwise_conv2d", "hff_attention", "hff_attention_tail")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
API_UNKNOWN = 2


def api_problem():
    """Why this Triton's compile API is not usable here (None when it is)."""
    import triton
    from triton import compiler

    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the kernels are interpreted functions, which do not compile"
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401 (only whether it exists)
    except ImportError:
        return f"triton {triton.__version__} has no triton.backends.compiler.GPUTarget"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} was installed without its NVIDIA backend"
    source = getattr(compiler, "ASTSource", None)
    if source is None or "constexprs" not in inspect.signature(source.__init__).parameters:
        return f"triton {triton.__version__}'s ASTSource does not take constexprs (the API of triton 3.3 and later)"
    return None


# ----------------------------------------------------------------------------------------------------------
# the launchers' calls: forward and backward of every op. With `every` (float32), each constexpr branch
# (optional inputs present and absent, each activation, both LayerNorm tile shapes); in the other dtypes,
# which change only the loads and stores, one call with every option on
# ----------------------------------------------------------------------------------------------------------
def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cross_scan(k, dtype, every):
    x = _z(2, 96, 28, 28, dtype=dtype)
    k["cross_scan"].cross_scan_fwd(x)
    k["cross_scan"].cross_merge_fwd(_z(2, 4, 96, 28, 28, dtype=dtype))


def _selective_scan(k, dtype, every):
    ss, S = k["selective_scan"], _acc(dtype)
    batch, dim, n, L = 1, 192, 16, 28 * 28  # L > CHUNK: the backward's forward pass saves chunk states
    for groups, full in ((1, True), (4, False))[:2 if every else 1]:
        u = _z(batch, dim, L, dtype=dtype)
        bc = _z(batch, groups, n, L, dtype=dtype)
        args = (u, u.clone(), _z(dim, n, dtype=S), bc, bc.clone())
        opt = (_z(dim, dtype=S), u.clone(), _z(dim, dtype=S)) if full else (None, None, None)
        ss.selective_scan_fwd(*args, *opt, full)
        ss.selective_scan_bwd(u.clone(), _z(batch, dim, n, dtype=S) if full else None, *args, *opt, full)


def _ss2d_scan(k, dtype, every):
    s2, S = k["ss2d_scan"], _acc(dtype)
    batch, dim, n, H, W = 1, 192, 16, 14, 14
    for full in (True, False)[:2 if every else 1]:
        u = _z(batch, dim, H, W, dtype=dtype)
        args = (u, _z(batch, 4, dim, H, W, dtype=dtype), _z(4 * dim, n, dtype=S), _z(batch, 4, n, H, W, dtype=dtype),
                _z(batch, 4, n, H, W, dtype=dtype))
        opt = (_z(4 * dim, dtype=S), _z(4 * dim, dtype=S)) if full else (None, None)
        s2.ss2d_scan_fwd(*args, *opt, full)
        s2.ss2d_scan_bwd(_z(batch, dim, H * W, dtype=dtype), *args, *opt, full)


def _depthwise(k, dtype, every):
    dw = k["depthwise_conv2d"]
    C = 96
    x, w, b = _z(2, C, 28, 28, dtype=dtype), _z(C, 1, 3, 3, dtype=dtype), _z(C, dtype=dtype)
    cases = (("gelu", b, 1), ("none", None, 1), ("silu", b, 1), ("relu", b, 2))
    for activation, bias, stride in cases[:len(cases) if every else 1]:
        out = dw.depthwise_conv2d_fwd(x, w, bias, stride, 1, activation, False)
        dw.depthwise_conv2d_bwd(torch.zeros_like(out), x, w, bias, stride, 1, activation)
    # HiFuse's first and last stages: LayerNorm tiles of 128 and 1024 channels
    for C, present in ((96, True), (96, False), (768, True))[:3 if every else 1]:
        x, w = _z(2, C, 14, 14, dtype=dtype), _z(C, 1, 3, 3, dtype=dtype)
        p = (_z(C, dtype=dtype), _z(C, dtype=dtype), _z(C, dtype=dtype)) if present else (None, None, None)
        out = dw.depthwise_conv2d_layernorm_fwd(x, w, *p, 1, 1, 1e-6)
        dw.depthwise_conv2d_layernorm_bwd(torch.zeros_like(out), x, w, *p, 1, 1, 1e-6)


def _hff(k, dtype, every):
    hff, tail, S = k["hff_attention"], k["hff_attention_tail"], _acc(dtype)
    B, C, H, W = 2, 96, 28, 28
    x = _z(B, C, H, W, dtype=dtype)
    conv, bn = _z(1, 2, 7, 7, dtype=S), _z(1, dtype=S)
    fc1, fc2 = _z(C // 16, C, dtype=S), _z(C, C // 16, dtype=S)
    for gate_only in (False, True)[:2 if every else 1]:
        # the attention ops (gate_only False); hff_attention_tail's gates (gate_only, the backward accumulating
        # into the tail's dx), with running statistics
        stats = (None, None, True) if not gate_only else (_z(1, dtype=S), _z(1, dtype=S) + 1, False)
        acc = x.clone() if gate_only else None
        y, _, _, pooled, argmax = hff.hff_spatial_gate_fwd(x, conv, bn, bn, *stats, 1e-5, gate_only)
        hff.hff_spatial_gate_bwd(torch.zeros_like(y), pooled, argmax, x, conv, bn, bn, *stats, 1e-5, gate_only, acc)
        y, pooled, argmax = hff.hff_channel_gate_fwd(x, fc1, fc2, gate_only)
        hff.hff_channel_gate_bwd(torch.zeros_like(y), pooled, argmax, x, fc1, fc2, gate_only, acc)
    l, g, x_f = x, _z(B, 2 * C, H, W, dtype=dtype), _z(B, C, H, W, dtype=dtype)
    ln = (_z(4 * C, dtype=S), _z(4 * C, dtype=S))
    gates = (_z(B, 1, H, W, dtype=S), _z(B, 2 * C, 1, 1, dtype=S))
    out, mean, rstd = tail.hff_fused_tail_fwd(l, g, x_f, *gates, *ln, 1e-6)
    tail.hff_fused_tail_bwd(torch.zeros_like(out), l, g, x_f, *gates, *ln, mean, rstd)


SCENARIOS = (_cross_scan, _selective_scan, _ss2d_scan, _depthwise, _hff)


def _kernel_modules():
    return {name: importlib.import_module(f"medkernels.kernels.{name}") for name in KERNEL_MODULES}


def all_kernels():
    """(module, name) of every @triton.jit entry point (a name ending in _kernel) in medkernels.kernels."""
    from triton.runtime.jit import JITFunction

    found = set()
    for info in pkgutil.iter_modules(importlib.import_module("medkernels.kernels").__path__):
        module = importlib.import_module(f"medkernels.kernels.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel") and value.fn.__module__ == module.__name__:
                found.add((module.__name__, attr))
    return found


# ----------------------------------------------------------------------------------------------------------
# from a recorded launch to triton.compile's arguments
# ----------------------------------------------------------------------------------------------------------
def _canonical(dtype):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}[dtype]


def specialization(launch):
    """(module, kernel name, signature, constexprs, divisible) of a launch: the argument types and values as a GPU
    launch specializes them (None and an int equal to 1 become constexprs; pointers and ints divisible by 16 get
    the divisibility attribute, listed in divisible by argument index)."""
    kernel = launch.kernel
    bound = inspect.signature(kernel.fn).bind(*launch.args, **launch.meta)
    signature, constexprs, divisible = {}, {}, []
    for index, param in enumerate(kernel.params):
        value = bound.arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, bool):
            signature[param.name] = "u1"
        elif isinstance(value, int):
            if value == 1:
                signature[param.name], constexprs[param.name] = "constexpr", 1
            else:
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    divisible.append(index)
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _canonical(value.dtype)
            if value.data_ptr() % 16 == 0:  # CUDA's allocations are 256-byte aligned
                divisible.append(index)
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} of unexpected type {type(value).__name__}")
    return kernel.fn.__module__, kernel.__name__, signature, constexprs, tuple(divisible)


def describe(spec):
    _, name, signature, constexprs, _ = spec
    pointers = sorted({t for t in signature.values() if t.startswith("*")})
    consts = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    return f"{name}[{'/'.join(pointers)}; {consts}]"


def _key(spec):
    module, name, signature, constexprs, divisible = spec
    return module, name, tuple(signature.items()), tuple((k, repr(v)) for k, v in constexprs.items()), divisible


def collect():
    """The distinct specializations of every scenario in every dtype, in order."""
    kernels = importlib.import_module("medkernels.kernels._utils")
    modules = _kernel_modules()
    specs = {}
    for scenario in SCENARIOS:
        for dtype in DTYPES:
            with kernels.tile_mode("gpu"), kernels.record_launches(run=False) as launches:
                scenario(modules, dtype, dtype == DTYPES[0])
            for launch in launches:
                spec = specialization(launch)
                specs.setdefault(_key(spec), spec)
    return list(specs.values()), all_kernels()


def compile_one(spec, arch):
    """triton.compile of one specialization for sm_<arch> down to a cubin; None, or the error as text."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, name, signature, constexprs, divisible = spec
    fn = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", arch, 32)
    parse_attr = getattr(make_backend(target), "parse_attr", None)
    attrs = {(i,): parse_attr("D") for i in divisible} if parse_attr is not None else None
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target)
        if not compiled.asm.get("cubin"):
            return "no cubin produced"
    except Exception as exc:  # noqa: BLE001 - any failure to lower is the finding, reported with the kernel's name
        lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
        return " | ".join(line.strip() for line in lines if line.strip())[:2000]
    return None


_worker_specs = []  # a worker process's own collect(): the same list, in the same order, as its parent's


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_indexed(arch, index):
    if not _worker_specs:
        _worker_specs.extend(collect()[0])
    spec = _worker_specs[index]
    return index, repr(_key(spec)), compile_one(spec, arch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    args = parser.parse_args(argv)
    problem = api_problem()
    if problem is not None:
        print(f"SKIP: {problem}")
        return API_UNKNOWN
    start = time.time()
    specs, kernels = collect()
    missing = kernels - {(module, name) for module, name, *_ in specs}
    failures = [f"NOT COMPILED {module}.{name}: no scenario launches it" for module, name in sorted(missing)]
    # a fresh cache: every kernel goes through the whole pipeline (and the user's cache stays as it was)
    with tempfile.TemporaryDirectory(prefix="medkernels-triton-sm90-") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        if args.jobs <= 1:
            results = [(i, repr(_key(spec)), compile_one(spec, args.arch)) for i, spec in enumerate(specs)]
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init,
                                                        initargs=(cache_dir,)) as pool:
                results = list(pool.map(_compile_indexed, [args.arch] * len(specs), range(len(specs))))
    for index, key, error in results:
        if key != repr(_key(specs[index])):
            failures.append(f"INTERNAL: a worker's specialization {index} is not {describe(specs[index])}")
        elif error is not None:
            failures.append(f"FAILED {describe(specs[index])}: {error}")
    for line in failures:
        print(line)
    names = {name for _, name, *_ in specs}
    print(f"sm_{args.arch}: {sum(e is None for *_, e in results)}/{len(specs)} specializations of "
          f"{len(names)} kernels compiled in {time.time() - start:.0f} s ({args.jobs} processes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
