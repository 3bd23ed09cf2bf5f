"""Pieces every benchmark module shares (kept here so that no two benchmark modules import each other in a
circle): which medkernels backends are timed on a device, and how a provider runs on one of them."""
import os

import torch

from medkernels import _backend

# the repository root: a child process that imports `benchmarks` needs it on its path
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# the device type each medkernels backend is timed on (None: any); Triton's CPU interpreter is a test tool,
# not a provider, so triton is timed on CUDA only
BACKEND_DEVICE = {"ref": None, "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def backends_for(device):
    """The medkernels backends that can run here and are timed on `device`, in medkernels' order."""
    kind = torch.device(device).type
    return [b for b in _backend.available_backends() if BACKEND_DEVICE.get(b, "unknown") in (None, kind)]


def kernel_backends(device):
    """backends_for without the pure-PyTorch ``ref`` backend."""
    return [b for b in backends_for(device) if b != "ref"]


def on_backend(backend, fn):
    """`fn` (a function of the inputs dict) run with the medkernels backend `backend` selected."""
    def call(t):
        with _backend.use_backend(backend):
            return fn(t)

    return call


def compiled(fn):
    """torch.compile of `fn`, compiled on its first call (which the op benchmark times as first_call_s)."""
    return torch.compile(fn, dynamic=False)


def importable(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False
