"""Op micro-benchmarks, one test per (op, shape, pass, provider), grouped per op, shape and pass.

Each timed call synchronises the device before returning, so GPU kernels are timed to completion.
"""
import pytest
import torch

from . import op_cases
from .op import FORWARD, FWD_BWD, max_abs_diff
from .timing import sync


def _device(config):
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    stages = {int(s) for s in config.getoption("--bench-stages").split(",") if s.strip()}
    quick = not config.getoption("--bench-compile")
    params = []
    for case in op_cases.all_cases(_device(config), stages, quick):
        for pass_name in (FORWARD, FWD_BWD):
            for provider in case.providers:
                params.append(pytest.param(case, pass_name, provider,
                                           id=f"{case.op}-{case.label}-{pass_name}-{provider}"))
    metafunc.parametrize("case,pass_name,provider", params)


def test_op(benchmark, request, case, pass_name, provider):
    reason = case.skip.get((provider, pass_name))
    if reason:
        pytest.skip(reason)
    device = _device(request.config)
    fn, inputs = case.providers[provider], case.inputs()
    benchmark.group = f"{case.op} {case.label} {pass_name}"
    benchmark.extra_info.update(op=case.op, shape=case.label, provider=provider)
    if pass_name == FORWARD:
        def run():
            with torch.no_grad():
                out = fn(inputs)
            sync(device)
            return out

        ref = case.providers["ref"]
        if provider != "ref":
            with torch.no_grad():
                benchmark.extra_info["max_abs_err_vs_ref"] = max_abs_diff(run(), ref(inputs))
    else:
        with torch.no_grad():
            grad = torch.randn_like(fn(inputs))

        def run():
            out = case.forward_backward(fn, inputs, grad)
            sync(device)
            return out

    benchmark.pedantic(run, rounds=request.config.getoption("--bench-rounds"), iterations=1, warmup_rounds=1)
