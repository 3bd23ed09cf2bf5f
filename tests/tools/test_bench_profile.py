"""benchmarks.profile: each module's self time goes to the module that spends it, forward and backward, through
nesting, pass-through modules and a block whose last layer produces its output; and the CLI writes its files."""
import json
import time

import torch
from torch import nn

from benchmarks import profile

NAP_S = 0.03


class _NapBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(NAP_S)
        return grad


class Napper(nn.Module):
    """Sleeps NAP_S in its forward and in its backward: a known amount of its own time in each."""

    def forward(self, x):
        time.sleep(NAP_S)
        return _NapBackward.apply(x)


class Block(nn.Module):
    """Its last layer's output is its own output (both get their output gradient at once), and its input is
    handed through an Identity."""

    def __init__(self):
        super().__init__()
        self.skip = nn.Identity()
        self.inner = Napper()

    def forward(self, x):
        return self.inner(self.skip(x) * 2.0)


def test_self_time_goes_to_the_innermost_module_forward_and_backward():
    model = nn.Sequential(Block(), nn.Linear(4, 4))
    x = torch.randn(3, 4, requires_grad=True)

    def step():
        model(x).sum().backward()

    rows, hooked_ms, _ = profile.module_self_times(model, step, repeats=2)
    by = {r["module"]: r for r in rows}
    nap_ms = NAP_S * 1e3
    assert by["Napper"]["calls"] == 1 and by["Block"]["calls"] == 1 and by["Identity"]["calls"] == 1
    assert by["Napper"]["forward_ms"] >= nap_ms and by["Napper"]["backward_ms"] >= nap_ms
    # the sleeps are the Napper's own: nothing around it may claim them
    for other in ("Block", "Identity", "Sequential", "Linear"):
        assert by[other]["forward_ms"] < nap_ms / 2, (other, by[other])
        assert by[other]["backward_ms"] < nap_ms / 2, (other, by[other])
    assert hooked_ms >= 2 * nap_ms


class StemBesideNapper(nn.Module):
    """A stem (a layer whose input needs no gradient) beside a Napper at the same depth. The stem runs second, so
    its backward runs first; it must end with its weight gradient, or the Napper's backward is counted as the
    stem's (the first of two equally deep open modules claims the time)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.napper = Napper()

    def forward(self, x, z):
        napped = self.napper(z)
        return self.stem(x).sum() + napped.sum()


def test_a_stem_without_input_gradient_ends_its_backward_with_its_weight_gradient():
    model = StemBesideNapper()
    x = torch.randn(3, 4)  # no gradient: the stem never sees its input's gradient complete
    z = torch.randn(3, 4, requires_grad=True)

    def step():
        model(x, z).backward()

    rows, _, parts = profile.module_self_times(model, step, repeats=2)
    by = {r["module"]: r for r in rows}
    assert by["Napper"]["backward_ms"] >= NAP_S * 1e3, by
    assert by["Linear"]["backward_ms"] < NAP_S * 1e3 / 2, by
    assert {(r["part"], r["module"]) for r in parts} >= {("stem", "Linear"), ("napper", "Napper"),
                                                         ("(network)", "StemBesideNapper")}


def test_part_names_collapse_stage_and_block_indices():
    assert profile.part_name("layers3.blocks.1.attn.qkv") == "layers*.blocks.*.attn.qkv"
    assert profile.part_name("fu2.W3.conv") == "fu*.W3.conv"
    assert profile.part_name("layers.0.blocks.1.self_attention") == "layers.*.blocks.*.self_attention"
    assert profile.part_name("") == "(network)"


def test_inference_has_no_backward_time():
    model = nn.Sequential(Napper(), nn.ReLU())
    x = torch.randn(2, 3)

    def step():
        with torch.no_grad():
            model(x)

    rows, _, _ = profile.module_self_times(model, step, repeats=1)
    assert all(r["backward_ms"] == 0 for r in rows)
    assert {r["module"]: r for r in rows}["Napper"]["forward_ms"] >= NAP_S * 1e3


def test_cli_writes_the_profile_of_a_network(tmp_path):
    out = tmp_path / "p.json"
    assert profile.main(["--models", "medmamba_t", "--passes", "inference", "train", "--batch", "1",
                         "--train-batch", "2", "--size", "64", "--repeats", "1", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    assert [p["pass"] for p in run["profiles"]] == [profile.INFERENCE, profile.TRAIN]
    for p in run["profiles"]:
        modules = {r["module"] for r in p["modules"]}
        assert {"SS2D", "SSConvSSM"} <= modules, modules
        assert p["step_ms"] > 0 and p["aten_ops"]
    assert any(r["backward_ms"] > 0 for r in run["profiles"][1]["modules"])
    md = (tmp_path / "p.md").read_text()
    assert "| SS2D |" in md and "train step" in md
    assert "| `layers.*.blocks.*.self_attention` | SS2D |" in md
