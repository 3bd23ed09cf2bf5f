"""Loading the compiled extension ``medkernels._C`` (C++ CPU kernels, plus CUDA kernels when built with them).

A missing or broken extension is not fatal: the package keeps working on the ``ref`` and ``triton``
backends, and the first use says why once.
"""
import importlib
import warnings

_module = None
_error = None
_tried = False


def _load():
    global _module, _error, _tried
    if _tried:
        return
    _tried = True
    try:
        _module = importlib.import_module("medkernels._C")
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from a mismatched torch
        _error = f"medkernels._C could not be loaded ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"{_error}; the 'cpu' and 'cuda' backends are off, the 'ref' and 'triton' backends still work. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def load_error():
    """None when the extension loaded, else why it did not."""
    _load()
    return _error


def module():
    """The extension module; raises if it could not be loaded."""
    _load()
    if _module is None:
        from ._backend import BackendUnavailableError

        raise BackendUnavailableError(_error)
    return _module


def build_info():
    """How the extension was built (a dict), or {} when it is not loaded."""
    _load()
    return dict(_module.build_info()) if _module is not None else {}
