"""The op micro-benchmark cases of the pytest-benchmark suite: for each op and shape, its inputs and its
providers (the same provider functions as ``python -m medkernels.bench``), and the (provider, pass) pairs
that are not run, with the reason."""
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import torch

from medkernels import ops
from medkernels import bench_scan as scan
from medkernels.bench import backends_for
from medkernels.ops.depthwise_conv_ref import depthwise_conv2d_ref
from medkernels.ops.hff_attention_ref import hff_channel_attention_ref, hff_spatial_attention_ref


@dataclass
class Case:
    op: str
    label: str
    make_inputs: Callable[[], dict]
    providers: Dict[str, Callable]
    skip: Dict[Tuple[str, str], str] = field(default_factory=dict)
    _inputs: dict = None

    def inputs(self):
        if self._inputs is None:
            self._inputs = self.make_inputs()
        return self._inputs


def _per_backend(device, fn, ref_fn):
    """ref (eager reference through the op), each kernel backend, and torch.compile of the reference."""
    providers = {"ref": scan._on_backend("ref", fn), "ref-compiled": scan._compiled(ref_fn)}
    for backend in backends_for(device):
        if backend != "ref":
            providers[backend] = scan._on_backend(backend, fn)
    return providers


def scan_cases(device, stages, quick):
    cases = []
    for stage in stages:
        s, d_inner, side = stage
        for op, shape, inputs, providers, bwd_dim, L in (
            ("selective_scan", scan.scan_shape(*stage), scan.scan_inputs, scan.scan_providers, 4 * d_inner, side**2),
            ("ss2d_scan", scan.ss2d_shape(*stage), scan.ss2d_inputs, scan.ss2d_providers, 4 * d_inner, side**2),
        ):
            provs = providers(device)
            skip = scan._skips(provs, device, L, scan.compile_skip_reason(device, quick, L),
                               scan.ref_backward_skip_reason(device, scan.BATCH, bwd_dim, L, scan.N),
                               scan._external(device))
            cases.append(Case(op, f"stage{s}", lambda i=inputs, sh=shape: i(device, **sh), provs, skip))
        shape = {"batch": scan.BATCH, "dim": d_inner, "H": side, "W": side}
        cases.append(Case("cross_scan", f"stage{s}", lambda sh=shape: scan.cross_inputs(device, **sh),
                          scan.cross_scan_providers(device)))
    return cases


def depthwise_cases(device, stages):
    """MedMamba's SS2D depthwise 3x3 conv with SiLU fused, on d_inner channels at each stage."""
    cases = []
    for s, d_inner, side in stages:
        def make(d=d_inner, n=side):
            g = torch.Generator().manual_seed(0)
            t = {"x": torch.randn(scan.BATCH, d, n, n, generator=g), "weight": torch.randn(d, 1, 3, 3, generator=g),
                 "bias": torch.randn(d, generator=g)}
            return {k: v.to(device) for k, v in t.items()}

        fn = lambda t: ops.depthwise_conv2d(t["x"], t["weight"], t["bias"], activation="silu")  # noqa: E731
        ref = lambda t: depthwise_conv2d_ref(t["x"], t["weight"], t["bias"], 1, 1, "silu")  # noqa: E731
        cases.append(Case("depthwise_conv2d", f"stage{s}", make, _per_backend(device, fn, ref)))
    return cases


def hff_cases(device, stages):
    """HiFuse's HFF attentions on a stage's local (spatial) and global (channel, r = 16) features; HiFuse-T's
    channels per stage equal MedMamba-T's d_inner (96 ... 768) at the same map sides."""
    cases = []
    for s, channels, side in stages:
        def make(c=channels, n=side):
            g = torch.Generator().manual_seed(0)
            t = {"x": torch.randn(scan.BATCH, c, n, n, generator=g), "conv": torch.randn(1, 2, 7, 7, generator=g),
                 "bn_w": torch.ones(1), "bn_b": torch.zeros(1), "fc1": torch.randn(c // 16, c, generator=g) / c**0.5,
                 "fc2": torch.randn(c, c // 16, generator=g) / (c // 16) ** 0.5}
            return {k: v.to(device) for k, v in t.items()}

        spatial = lambda t: ops.hff_spatial_attention(t["x"], t["conv"], t["bn_w"], t["bn_b"], None, None,  # noqa: E731
                                                      training=True)
        spatial_ref = lambda t: hff_spatial_attention_ref(t["x"], t["conv"], t["bn_w"], t["bn_b"], None, None,  # noqa: E731
                                                          True, 1e-5)[0]
        channel = lambda t: ops.hff_channel_attention(t["x"], t["fc1"], t["fc2"])  # noqa: E731
        channel_ref = lambda t: hff_channel_attention_ref(t["x"], t["fc1"], t["fc2"])  # noqa: E731
        cases.append(Case("hff_spatial_attention", f"stage{s}", make, _per_backend(device, spatial, spatial_ref)))
        cases.append(Case("hff_channel_attention", f"stage{s}", make, _per_backend(device, channel, channel_ref)))
    return cases


def all_cases(device, stage_numbers, quick):
    stages = [st for st in scan.MEDMAMBA_T_STAGES if st[0] in stage_numbers]
    return scan_cases(device, stages, quick) + depthwise_cases(device, stages) + hff_cases(device, stages)
