"""The six networks and every medkernels.nn module in mixed precision, on every backend: under autocast
(bfloat16 and float16 on CPU; bfloat16 and float16 with GradScaler on CUDA) and with their weights cast
(``.to(torch.bfloat16)``, ``.half()``): forward and backward run, losses and gradients are finite, the
statistics keep their dtype, and the logits stay within a stated tolerance of float32."""
import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels import models
from medkernels import nn as mknn

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["hifuse_tiny", "hifuse_small", "hifuse_base", "medmamba_t", "medmamba_s", "medmamba_b"]
# the logits of a half-precision run, relative to float32 in the norm: ||y - y32|| <= REL * ||y32||
# (measured at 64x64 with the official fill rule: 0.8-1.0e-2 for bfloat16 on every backend)
REL = 5e-2
SIZE = 32


@functools.lru_cache(maxsize=None)
def _template(name):
    torch.manual_seed(0)
    return getattr(models, name)(num_classes=4, drop_path_rate=0.0)


def _model(name):
    return copy.deepcopy(_template(name))


def _input(batch=2, device="cpu"):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)).to(device)


def _rel(actual, expected):
    return float((actual.detach().float() - expected).norm() / expected.norm())


def _stats(model):
    return {n: b for n, b in model.named_buffers() if "running" in n}


@functools.lru_cache(maxsize=None)
def _with_grads(name):
    """Names of the parameters a float32 training step gives a gradient (the official networks keep modules
    their forward never uses: GlobalBlock.norm2, the first HFF block's Updim, ...)."""
    model = _model(name).train()
    with medkernels.use_backend("ref"):
        F.cross_entropy(model(_input()), torch.tensor([1, 3])).backward()
    return frozenset(n for n, p in model.named_parameters() if p.grad is not None)


def _check_step(model, loss, param_dtype, expected_names, finite=True):
    assert torch.isfinite(loss), f"loss {loss}"
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected_names
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == param_dtype, f"{n}: gradient dtype {p.grad.dtype}"
            assert not finite or torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"


def _autocast_case(name, backend, device, amp):
    """Eval-mode logits under autocast against float32, then one training step under autocast (float16 with a
    GradScaler, whose step skips an overflowing update and lowers the scale instead)."""
    device = torch.device(device)
    model = _model(name).to(device)
    x, target = _input(device=device), torch.tensor([1, 3], device=device)
    model.eval()
    with torch.no_grad():
        with medkernels.use_backend(_fast(backend)):
            expected = model(x)
        with medkernels.use_backend(backend), torch.autocast(device.type, dtype=amp):
            logits = model(x)
    with medkernels.use_backend(backend):
        assert logits.dtype == amp  # the classifier head is a Linear: the official network ends in the autocast dtype
        assert _rel(logits, expected) <= REL, f"{name}: logits {_rel(logits, expected):.3e} from float32"
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        with torch.autocast(device.type, dtype=amp):
            loss = F.cross_entropy(model(x), target)
        if scaler is None:
            loss.backward()
            _check_step(model, loss, torch.float32, _with_grads(name))
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            scaler.step(optimizer)
            scaler.update()
            _check_step(model, loss, torch.float32, _with_grads(name), finite=False)
            assert finite or scaler.get_scale() < scale, "non-finite gradients but the GradScaler kept its scale"
    for n, b in _stats(model).items():
        assert b.dtype == torch.float32, f"{n} became {b.dtype}"
        assert torch.isfinite(b).all(), f"{n} is not finite"


def _half_weights_case(name, backend, device, dtype):
    """Eval-mode logits with the weights cast, against float32, and a backward through the cast network (eval
    mode: batch statistics of a 32x32 batch of two are too few to keep a half-precision backward in range)."""
    reference = _model(name).to(device).eval()
    model = _model(name).to(device=device, dtype=dtype).eval()
    x = _input(device=device)
    with torch.no_grad(), medkernels.use_backend(_fast(backend)):
        expected = reference(x)
    with medkernels.use_backend(backend):
        logits = model(x.to(dtype))
        assert logits.dtype == dtype
        assert _rel(logits, expected) <= REL, f"{name}: logits {_rel(logits, expected):.3e} from float32"
        loss = F.cross_entropy(logits.float(), torch.tensor([0, 2], device=device))
        loss.backward()
    _check_step(model, loss, dtype, _with_grads(name))
    for n, b in _stats(model).items():
        assert b.dtype == dtype, f"{n}: {b.dtype} (module.to casts buffers too, as in PyTorch)"


TINY = ["hifuse_tiny", "medmamba_t"]
# The six networks differ in depth and width, not in the ops they run: all six run on the compiled cpu backend,
# the tiny two on the reference and on Triton's CPU interpreter (minutes per network there).
_SIX_ON = ("cpu",)


def _fast(backend):
    """The backend of the float32 logits a half-precision run is held to: the compiled one when it is there
    (the Triton interpreter would double a test's minutes for a float32 forward no kernel question rests on)."""
    return "cpu" if medkernels.unavailable_reason("cpu") is None and backend != "ref" else backend


def _skip_large(backend, name):
    if backend not in _SIX_ON and name not in TINY:
        pytest.skip(f"{name} on {backend}: the tiny networks stand for the larger ones there (same ops, more of them)")


@pytest.mark.parametrize("name", NAMES)
def test_network_under_cpu_bfloat16_autocast(cpu_backend, name):
    _skip_large(cpu_backend, name)
    _autocast_case(name, cpu_backend, "cpu", torch.bfloat16)


@pytest.mark.parametrize("name", NAMES)
def test_network_with_bfloat16_weights_on_cpu(cpu_backend, name):
    _skip_large(cpu_backend, name)
    _half_weights_case(name, cpu_backend, "cpu", torch.bfloat16)


def _require_backend(backend):
    if backend != "auto" and medkernels.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} unavailable: {medkernels.unavailable_reason(backend)}")


# float16 on CPU, beyond the bfloat16 CPU users train in: the weights cast, and autocast with a GradScaler
FLOAT16_CASES = [pytest.param(_half_weights_case, id="float16-weights"),
                 pytest.param(_autocast_case, id="float16-autocast-gradscaler")]


@pytest.mark.parametrize("case", FLOAT16_CASES)
@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("name", TINY)
def test_network_in_float16_on_cpu(case, backend, name):
    _require_backend(backend)
    case(name, backend, "cpu", torch.float16)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA_CASES = [pytest.param(_autocast_case, torch.bfloat16, id="bfloat16-autocast"),
              pytest.param(_autocast_case, torch.float16, id="float16-autocast-gradscaler"),
              pytest.param(_half_weights_case, torch.bfloat16, id="bfloat16-weights"),
              pytest.param(_half_weights_case, torch.float16, id="float16-weights")]


@_CUDA
@pytest.mark.parametrize("case, dtype", CUDA_CASES)
@pytest.mark.parametrize("backend", ["auto", "ref", "cuda", "triton"])
@pytest.mark.parametrize("name", TINY)
def test_network_in_half_precision_on_cuda(case, dtype, backend, name):
    _require_backend(backend)
    case(name, backend, "cuda", dtype)


# ---- modules -------------------------------------------------------------------------------------

def _depthwise():
    return mknn.DepthwiseConv2d(6, 3, activation="silu"), (torch.randn(2, 6, 7, 9),)


def _local():
    return mknn.LocalBlock(8), (torch.randn(2, 8, 7, 7),)


def _global():
    block = mknn.GlobalBlock(8, 2, window_size=7, shift_size=3)
    return block, (torch.randn(2, 81, 8), 9, 9)


def _hff():
    block = mknn.HFFBlock(ch_1=8, ch_2=8, r_2=4, ch_int=8, ch_out=8)
    return block, (torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6), torch.randn(2, 4, 12, 12))


def _ss2d():
    return mknn.SS2D(d_model=8, d_state=4), (torch.randn(2, 5, 6, 8),)


def _ssconvssm():
    return mknn.SSConvSSM(hidden_dim=8, d_state=4), (torch.randn(2, 5, 6, 8),)


MODULES = [pytest.param(f, id=f.__name__.strip("_")) for f in (_depthwise, _local, _global, _hff, _ss2d, _ssconvssm)]


def _tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("make", MODULES)
def test_module_under_cpu_autocast(cpu_backend, make):
    torch.manual_seed(0)
    module, args = make()
    module.train()
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with medkernels.use_backend(cpu_backend):
        with torch.no_grad():
            module.eval()
            expected = module(*args)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = module(*args)
        assert _rel(got, expected) <= REL
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*args)
        out.float().square().mean().backward()
    for n, p in module.named_parameters():
        if p.grad is not None:  # the official blocks keep parameters their forward never uses (norm2, ...)
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    for a in _tensors(args):
        assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    for n, b in _stats(module).items():
        assert b.dtype == torch.float32, n


@pytest.mark.parametrize("make", MODULES)
def test_module_with_bfloat16_weights(cpu_backend, make):
    torch.manual_seed(0)
    module, args = make()
    module = module.to(torch.bfloat16)
    args = [a.bfloat16().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with medkernels.use_backend(cpu_backend):
        out = module(*args)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
    for a in _tensors(args):
        assert a.grad is not None and a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("name", ["medmamba_t"])
def test_example_training_script_with_amp_saves_a_checkpoint_that_reloads(tmp_path, name):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "examples/train.py", "--model", name, "--image-size", "32", "--train-size", "8",
           "--batch-size", "4", "--epochs", "1", "--amp", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "epoch 0: loss" in res.stdout and "reloads exactly" in res.stdout, res.stdout
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key, t in state["model"].items():
        if t.is_floating_point():
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), key
    getattr(models, name)(num_classes=4).load_state_dict(state["model"])  # strict
