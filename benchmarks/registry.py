"""The one declarative list of what is benchmarked: every op and network, with its shapes, its providers,
the function ``python -m benchmarks`` runs for it (``--ops`` / ``--models`` name it) and, for the ops, the
function that gives the pytest-benchmark suite (benchmarks/test_ops.py) its cases: the same shapes and the
same provider functions. Functions are named as "module:function" and imported lazily.

An op benchmark is ``fn(device, time_call, warmup, repeats, quick=True) -> list of rows`` (see
benchmarks/README.md for the row schema). A cases function is ``fn(device, stages, quick) -> [op.Case]``,
`stages` the MedMamba-T stage numbers (1-4) whose shapes to use. A module that is not in this checkout is
skipped with a note, so an op's benchmark module can land separately from this registry.
"""
import importlib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Bench:
    name: str
    run: str  # "module:function" of the CLI's benchmark
    shapes: str  # what it is timed at (documentation, shown by --list)
    providers: str  # side by side in one run; the first named is the baseline
    cases: Optional[str] = None  # "module:function" of the pytest-benchmark cases (ops only)


STAGE_SHAPES = "MedMamba-T's stage shapes at 224x224 (stages 1 and 4 with --quick)"

OPS = (
    Bench("selective_scan", "benchmarks.scan:bench_selective_scan", STAGE_SHAPES + ", batch 2",
          "ref, each backend, ref-compiled, mambapy (CPU) / mamba_ssm (GPU)", "benchmarks.scan:selective_scan_cases"),
    Bench("ss2d_scan", "benchmarks.scan:bench_ss2d", STAGE_SHAPES + ", batch 2",
          "ref, each backend fused and unfused, ref-compiled, mambapy / mamba_ssm", "benchmarks.scan:ss2d_cases"),
    Bench("cross_scan", "benchmarks.scan:bench_cross_scan", STAGE_SHAPES + ", batch 2",
          "ref, each backend, ref-compiled", "benchmarks.scan:cross_scan_cases"),
    Bench("depthwise_conv2d", "benchmarks.depthwise:bench_depthwise_conv",
          "the four stage shapes, batch 8 (CPU) / 64 (GPU); depthwise_conv2d and depthwise_conv2d_layernorm",
          "pytorch, ref, each backend", "benchmarks.depthwise:depthwise_cases"),
    Bench("hff_attention", "benchmarks.hff:bench_hff",
          "HiFuse-T's four HFF scales, batch 8 (CPU) / 64 (GPU); hff_attention_tail and the whole hff_block",
          "eager, ref, each backend, compile (CUDA)", "benchmarks.hff:hff_cases"),
    Bench("conv3x3", "benchmarks.conv3x3:bench_conv3x3",
          "HiFuse-T's four IRMLP 3x3 convolutions (288-2304 channels), batch 8 (CPU) / 64 (GPU), float32",
          "ref (F.conv2d, NCHW), channels_last (F.conv2d), each backend", "benchmarks.conv3x3:conv3x3_cases"),
)

NETWORKS = (
    Bench("hifuse_tiny", "benchmarks.networks:bench_hifuse_tiny", "224x224, two inference batches, one training step",
          "ref, medkernels, ref-compiled, bf16 autocast and bf16 weights of medkernels and ref"),
    Bench("medmamba_t", "benchmarks.networks:bench_medmamba_t", "224x224, two inference batches, one training step",
          "ref, medkernels, ref-compiled, bf16 rows, mambapy (CPU) / official (GPU)"),
)

OP_BENCHES = {b.name: b.run for b in OPS}
MODEL_BENCHES = {b.name: b.run for b in NETWORKS}
OP_CASES = {b.name: b.cases for b in OPS if b.cases}


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
