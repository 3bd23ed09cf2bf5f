"""The cases of the pytest-benchmark suite, drawn from the one registry of benchmarks (registry.OPS): for
each op, the cases function it names gives the same shapes and provider functions as ``python -m benchmarks``
times, and the (provider, pass) pairs that are not run, with the reason."""
from .registry import OP_CASES, BenchUnavailable, load


def all_cases(device, stage_numbers, quick, ops=None):
    """[op.Case] of every op in the registry (or those named in `ops`) at the MedMamba-T stages given."""
    cases = []
    for name, spec in OP_CASES.items():
        if ops is not None and name not in ops:
            continue
        try:
            make = load(spec)
        except BenchUnavailable:
            continue  # the op's module is not in this checkout: nothing to collect
        cases += make(device, set(stage_numbers), quick)
    return cases
