"""medkernels.train: train, evaluate and predict on an image folder from the command line.

Run ``python -m medkernels.train {train,evaluate,predict} --help``. The optional dependencies
(torchvision, scikit-learn, matplotlib, tqdm, Pillow; ``pip install medkernels[train]``) are imported
only when a command runs, so ``import medkernels`` never needs them.
"""
from .errors import UsageError


def main(argv=None):
    """Run the command line with `argv` (default: sys.argv[1:]); returns the exit code."""
    from .cli import main as _main

    return _main(argv)


def compute_metrics(labels, probs, class_names):
    """See :func:`medkernels.train.metrics.compute_metrics`."""
    from .metrics import compute_metrics as _compute

    return _compute(labels, probs, class_names)


__all__ = ["UsageError", "main", "compute_metrics"]
