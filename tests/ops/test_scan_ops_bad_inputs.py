"""The bad-input matrix of the scan ops (selective_scan, ss2d_scan, cross_scan, cross_merge): each bad argument gets
a Python exception naming it, on every backend; empty sizes give correct empty results; NaN and Inf propagate
exactly where the reference puts them.

"Naming it" is checked with the name as a word of the message (``_named``): a bare ``match="u"`` would also pass
on the u of "must"."""
import pytest
import torch

import medkernels
from medkernels import ops
from medkernels.ops.selective_scan_ref import selective_scan_ref
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

from helpers.matching import named


def _scan_args(b=2, d=4, L=9, n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(b, d, L, generator=g, dtype=dtype), delta=torch.rand(b, d, L, generator=g, dtype=dtype),
                A=-torch.rand(d, n, generator=g) - 0.1, B=torch.randn(b, n, L, generator=g, dtype=dtype),
                C=torch.randn(b, n, L, generator=g, dtype=dtype), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, L, generator=g, dtype=dtype), delta_bias=torch.rand(d, generator=g))


def _ss2d_args(b=1, d=2, h=3, w=4, n=3):
    g = torch.Generator().manual_seed(1)
    return dict(u=torch.randn(b, d, h, w, generator=g), delta=torch.rand(b, 4, d, h, w, generator=g),
                A=-torch.rand(4 * d, n, generator=g) - 0.1, B=torch.randn(b, 4, n, h, w, generator=g),
                C=torch.randn(b, 4, n, h, w, generator=g), D=torch.randn(4 * d, generator=g),
                delta_bias=torch.rand(4 * d, generator=g))


def _meta(t):
    return t.to("meta")


SCAN_CASES = {
    "u-rank": ("u", lambda a: a["u"][0], ValueError),
    "u-integer": ("u", lambda a: a["u"].long(), TypeError),
    "u-complex": ("u", lambda a: a["u"].to(torch.complex64), TypeError),
    "delta-shape": ("delta", lambda a: a["delta"][:, :, :-1], ValueError),
    "delta-dtype": ("delta", lambda a: a["delta"].double(), TypeError),
    "A-complex": ("A", lambda a: a["A"].to(torch.complex64), TypeError),
    "A-rows": ("A", lambda a: a["A"][:-1], ValueError),
    "A-state-too-large": ("A", lambda a: -torch.ones(a["A"].shape[0], 257), ValueError),
    "B-length": ("B", lambda a: a["B"][..., :-1], ValueError),
    "B-groups-not-dividing": ("B", lambda a: a["B"].unsqueeze(1).expand(-1, 3, -1, -1), ValueError),
    "C-rank": ("C", lambda a: a["C"][0], ValueError),
    "D-shape": ("D", lambda a: a["D"][:-1], ValueError),
    "z-shape": ("z", lambda a: a["z"][:, :-1], ValueError),
    "delta_bias-integer": ("delta_bias", lambda a: a["delta_bias"].long(), TypeError),
    "B-other-device": ("B", lambda a: _meta(a["B"]), ValueError),
}
# the device message lists every tensor's device: the culprit is the one on meta
PHRASE = {"B-other-device": "B on meta", "C-other-device": "C on meta"}


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_bad_argument_isnamed(cpu_backend, case):
    name, corrupt, error = SCAN_CASES[case]
    args = _scan_args()
    args[name] = corrupt(args)
    with medkernels.use_backend(cpu_backend), pytest.raises(error, match=named(PHRASE.get(case, name))):
        ops.selective_scan(**args, delta_softplus=True)


SS2D_CASES = {
    "u-rank": ("u", lambda a: a["u"][0], ValueError),
    "u-integer": ("u", lambda a: a["u"].int(), TypeError),
    "delta-directions": ("delta", lambda a: a["delta"][:, :3], ValueError),
    "A-rows": ("A", lambda a: a["A"][:-1], ValueError),
    "A-complex": ("A", lambda a: a["A"].to(torch.complex64), TypeError),
    "B-size": ("B", lambda a: a["B"][..., :-1], ValueError),
    "C-other-device": ("C", lambda a: _meta(a["C"]), ValueError),
    "D-shape": ("D", lambda a: a["D"][:-1], ValueError),
}


@pytest.mark.parametrize("case", list(SS2D_CASES))
def test_ss2d_scan_bad_argument_isnamed(cpu_backend, case):
    name, corrupt, error = SS2D_CASES[case]
    args = _ss2d_args()
    args[name] = corrupt(args)
    with medkernels.use_backend(cpu_backend), pytest.raises(error, match=named(PHRASE.get(case, name))):
        ops.ss2d_scan(**args)


@pytest.mark.parametrize("bad", [torch.randn(2, 3, 4), torch.randint(0, 3, (1, 2, 3, 4)), "not a tensor"],
                         ids=["rank3", "integer", "str"])
def test_cross_scan_bad_input_isnamed(cpu_backend, bad):
    with medkernels.use_backend(cpu_backend), pytest.raises((TypeError, ValueError), match=named("x")):
        ops.cross_scan(bad)


def test_cross_merge_bad_input_isnamed(cpu_backend):
    with medkernels.use_backend(cpu_backend), pytest.raises(ValueError, match=named("y")):
        ops.cross_merge(torch.randn(1, 3, 2, 4, 4))  # 3 directions


@pytest.mark.parametrize("empty", ["batch", "dim", "L"])
def test_selective_scan_empty_sizes_give_empty_results(cpu_backend, empty):
    sizes = dict(b=2, d=4, L=9)
    sizes[{"batch": "b", "dim": "d", "L": "L"}[empty]] = 0
    args = {k: v.requires_grad_() for k, v in _scan_args(**sizes).items()}
    with medkernels.use_backend(cpu_backend):
        out, last = ops.selective_scan(**args, delta_softplus=True, return_last_state=True)
        assert out.shape == args["u"].shape and last.shape == (sizes["b"], sizes["d"], 3)
        assert torch.equal(last, torch.zeros_like(last))  # no position: the initial zero state
        (out.sum() + last.sum()).backward()
    for name, t in args.items():
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["u", "delta", "B", "C"])
def test_selective_scan_nonfinite_propagates_like_the_reference(cpu_backend, value, where):
    args = _scan_args()
    args[where] = args[where].clone()
    args[where].view(-1)[5] = value
    with medkernels.use_backend(cpu_backend):
        out = ops.selective_scan(**args, delta_softplus=True)
    exp = selective_scan_ref(*[t.double() for t in args.values()], True)[0]
    assert torch.equal(out.isnan(), exp.isnan()) and torch.equal(out.isinf(), exp.isinf())
    fin = exp.isfinite()
    torch.testing.assert_close(out[fin].double(), exp[fin], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_ss2d_scan_nonfinite_propagates_like_the_reference(cpu_backend, value):
    args = _ss2d_args()
    args["u"] = args["u"].clone()
    args["u"].view(-1)[7] = value
    with medkernels.use_backend(cpu_backend):
        out = ops.ss2d_scan(**args)
    exp = ss2d_scan_ref(*[t.double() for t in args.values()], True).reshape(out.shape)
    assert torch.equal(out.isnan(), exp.isnan()) and torch.equal(out.isinf(), exp.isinf())
