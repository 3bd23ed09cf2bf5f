"""Which benchmark runs for each ``--ops`` / ``--models`` name, as "module:function", imported lazily.

An op benchmark is ``fn(device, time_call, warmup, repeats, quick=True) -> list of rows`` (see
benchmarks/README.md for the row schema). A module that is not in this checkout is skipped with a note, so
an op's benchmark module can land separately from this registry.
"""
import importlib

OP_BENCHES = {
    "selective_scan": "medkernels.bench_scan:bench_selective_scan",
    "ss2d_scan": "medkernels.bench_scan:bench_ss2d",
    "cross_scan": "medkernels.bench_scan:bench_cross_scan",
    "depthwise_conv2d": "medkernels.bench_depthwise:bench_depthwise_conv",
    "hff_attention": "medkernels.bench_hff:bench_hff",
}

MODEL_BENCHES = {
    "hifuse_tiny": "medkernels.bench_models:bench_hifuse_tiny",
    "medmamba_t": "medkernels.bench_models:bench_medmamba_t",
}


class BenchUnavailable(Exception):
    """The benchmark named cannot be loaded here; the message says why."""


def load(spec):
    """The function that "module:function" names (a callable is its own spec); BenchUnavailable when its
    module is absent."""
    if callable(spec):
        return spec
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module is there but one of its own imports is missing: a real error
        raise BenchUnavailable(f"{module_name} is not in this checkout") from exc
    try:
        return getattr(module, function_name)
    except AttributeError as exc:
        raise BenchUnavailable(f"{module_name} has no {function_name}()") from exc
