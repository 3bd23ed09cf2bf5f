"""medkernels: custom kernels for HiFuse and MedMamba medical image classification networks.

Ops live in ``medkernels.ops``, drop-in modules in ``medkernels.nn`` and the full networks in
``medkernels.models``. Choose a backend with ``use_backend``/``set_backend`` or ``$MEDKERNELS_BACKEND``.
"""
import importlib

from . import ops
from ._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    unavailable_reason,
    use_backend,
)
from .info import info

__version__ = "0.1.0"

__all__ = [
    "ops",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "unavailable_reason",
    "info",
    "__version__",
]


def __getattr__(name):
    # medkernels.nn and medkernels.models load on first use, keeping `import medkernels` light
    if name in ("nn", "models"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
