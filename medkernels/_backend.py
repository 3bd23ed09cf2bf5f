"""Backend selection: which implementation of an op runs for given tensors.

Backends: ``ref`` (pure PyTorch, always there), ``cpu`` (C++ in ``medkernels._C``), ``cuda`` (CUDA C++ in
``medkernels._C``), ``triton`` (``medkernels.kernels``; on CPU tensors only under ``TRITON_INTERPRET=1``).
``auto`` picks, per op and device, the fastest available backend that implements the op.
"""
import contextlib
import contextvars
import importlib
import os
import warnings

import torch

BACKENDS = ("ref", "cpu", "cuda", "triton")
CHOICES = ("auto",) + BACKENDS

# auto's preference order per device type; the reference is always the last resort.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for explicitly but cannot run here."""


def _check_choice(name):
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    return name


_requested = contextvars.ContextVar("medkernels_backend", default=None)
_default = None  # set by set_backend; None means MEDKERNELS_BACKEND or "auto"


def _context_choice():
    return _requested.get()


def _version(text):
    """(major, minor) of a version string such as "2.11.0+cu130"."""
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


if _version(torch.__version__) < (2, 14):
    # torch.compile before 2.14 (checked on 2.11) cannot trace ContextVar.get and breaks the graph there; the
    # choice is read once at trace time instead, so a use_backend block around a compiled call must be entered
    # before its first call (torch 2.14 traces the read itself)
    _context_choice = torch._dynamo.assume_constant_result(_context_choice)


def get_backend():
    """The backend asked for now: use_backend's, else set_backend's, else $MEDKERNELS_BACKEND, else "auto"."""
    name = _context_choice() or _default or os.environ.get("MEDKERNELS_BACKEND") or "auto"
    return _check_choice(name)


def _require_available(name):
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(f"medkernels backend {name!r} is unavailable: {reason}")


def set_backend(name):
    """Choose the backend for all later calls ("auto", "ref", "cpu", "cuda" or "triton")."""
    global _default
    _require_available(_check_choice(name))
    _default = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the ops inside the block on backend `name`."""
    _require_available(_check_choice(name))
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_reasons = {}  # a plain dict rather than lru_cache, so torch.compile reads it instead of re-tracing the probe


def unavailable_reason(name):
    """None when backend `name` can run on this machine, else a sentence saying why not."""
    if name not in _reasons:
        _reasons[name] = _probe(name)
    return _reasons[name]


def _probe(name):
    from . import _ext

    if name == "ref":
        return None
    if name == "cpu":
        return _ext.load_error()
    if name == "cuda":
        if _ext.load_error() is not None:
            return _ext.load_error()
        if not _ext.build_info().get("cuda"):
            return "medkernels._C was built without CUDA kernels (CPU-only build)"
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except Exception as exc:  # an unusable triton install can raise more than ImportError
            return f"triton cannot be imported ({type(exc).__name__}: {exc})"
        try:
            importlib.import_module("medkernels.kernels")
        except ImportError as exc:
            return f"the Triton kernels (medkernels.kernels) are not installed ({exc})"
        if not torch.cuda.is_available() and not triton_interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors, slowly)"
        if not torch.cuda.is_available():
            return _interpreter_numpy_problem()
        return None
    raise ValueError(f"unknown backend {name!r}")


def _interpreter_numpy_problem():
    """Triton 3.6's interpreter turns runtime loop bounds into Python ints with int() of a one-element array,
    which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); checked with
    triton 3.6.0 + numpy 2.4.6 (fails) and numpy 2.3 (works). Triton 3.8 is fine with numpy 2.4."""
    import triton

    try:
        import numpy
    except ImportError:
        return "the Triton interpreter needs numpy (pip install numpy)"
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} fails with numpy {numpy.__version__}: "
                "install numpy<2.4, or triton>=3.8")
    return None


def available_backends():
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _runs_on(backend, device_type):
    if backend == "ref":
        return True
    if backend == "cpu":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return False


class OpTable:
    """The implementations of one op, by backend. Non-reference ones are loaded lazily."""

    def __init__(self, name, ref):
        self.name = name
        self._loaders = {"ref": lambda: ref}
        self._loaded = {}
        self._nondeterministic = set()
        self._auto_uses_ref = set()
        OPS[name] = self

    def prefer_ref_for_auto(self, device_type):
        """Make ``auto`` run the reference (plain PyTorch) on `device_type` tensors, where measurements showed
        every kernel of this op slower than PyTorch there (the caller cites them). An explicitly requested
        backend still runs."""
        self._auto_uses_ref.add(device_type)

    def auto_uses_ref(self, device_type):
        return device_type in self._auto_uses_ref

    def register(self, backend, loader, deterministic=True):
        """Add `backend`'s implementation; `deterministic=False` marks one whose results can vary from run to
        run (atomics): ``auto`` then passes it over under ``torch.use_deterministic_algorithms(True)``, and the
        kernel itself raises PyTorch's standard error when asked for explicitly in that mode."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self._loaders[backend] = loader
        if not deterministic:
            self._nondeterministic.add(backend)

    def deterministic_in(self, backend):
        return backend not in self._nondeterministic

    def implemented_in(self, backend):
        return backend in self._loaders

    def impl(self, backend):
        """The implementation for `backend`; the reference where that backend has none yet."""
        if backend not in self._loaders:
            backend = "ref"
        if backend not in self._loaded:
            self._loaded[backend] = self._loaders[backend]()
        return self._loaded[backend]


OPS = {}
_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(table, device):
    """Name of the backend that runs `table`'s op on tensors of `device` under the current choice."""
    device_type = torch.device(device).type
    requested = get_backend()
    if requested == "auto":
        if table.auto_uses_ref(device_type):
            return "ref"
        order = _AUTO_ORDER.get(device_type, ())
        for backend in order:
            reason = unavailable_reason(backend)
            if reason is not None:
                if backend == order[0]:
                    _warn_once(
                        ("auto", backend),
                        f"medkernels: the {backend!r} backend is unavailable ({reason}); "
                        "falling back to the next available backend (slower)",
                    )
                continue
            if table.implemented_in(backend):
                if not table.deterministic_in(backend) and torch.are_deterministic_algorithms_enabled():
                    continue
                return backend
        return "ref"
    _require_available(requested)
    if not _runs_on(requested, device_type):
        hint = " (set TRITON_INTERPRET=1 for CPU tensors)" if requested == "triton" else ""
        raise ValueError(
            f"medkernels backend {requested!r} cannot run op {table.name!r} on {device_type} tensors{hint}"
        )
    return requested if table.implemented_in(requested) else "ref"


def gaps():
    """{backend: [ops that run their reference there because the backend has no implementation yet]}."""
    return {b: sorted(n for n, t in OPS.items() if not t.implemented_in(b)) for b in BACKENDS if b != "ref"}
