"""Command line: ``python -m medkernels.train {train,evaluate,predict} ...``.

Bad input (a folder, an image, a checkpoint, an option) ends with one line on stderr and exit code 2.
"""
import argparse
import sys

from .checkpoints import MODEL_NAMES
from .errors import UsageError

BACKEND_CHOICES = ("auto", "ref", "cpu", "cuda", "triton")


def _common(p, batch_size):
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step (per process under DDP)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(4, CPU count))")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast precision (fp16 on CUDA only, with a GradScaler when training)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="medkernels kernel backend")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _train_parser(sub):
    p = sub.add_parser("train", help="train a model on an image folder")
    p.add_argument("--model", choices=MODEL_NAMES, required=True)
    p.add_argument("--data", required=True,
                   help="folder of class folders, or one holding train/ and val/ folders of class folders")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>)")
    p.add_argument("--val-split", type=float, default=0.2,
                   help="fraction held out for validation when --data has no train/ and val/ folders")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from an official checkpoint (the classifier head is replaced when the class count differs)")
    _common(p, batch_size=32)


def _evaluate_parser(sub):
    p = sub.add_parser("evaluate", help="the papers' metrics of a checkpoint on a split folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="split folder of class folders (e.g. <root>/test)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval-<split name>)")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="refuse a checkpoint of another model")
    p.add_argument("--image-size", type=int, default=None, help="default: the training image size")
    _common(p, batch_size=64)


def _predict_parser(sub):
    p = sub.add_parser("predict", help="top-k classes of image files or folders")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--csv", default=None, help="write the predictions to this CSV file instead of printing them")
    p.add_argument("--image-size", type=int, default=None, help="default: the training image size")
    _common(p, batch_size=64)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m medkernels.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    return parser


def _run(args):
    from .data import default_workers

    if args.workers is None:
        args.workers = default_workers()
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.command == "train":
        from .train_cmd import run_train

        args.out = args.out or f"runs/{args.model}"
        return run_train(args)
    from .eval_cmd import run_evaluate, run_predict

    return run_evaluate(args) if args.command == "evaluate" else run_predict(args)


def _missing_dependency(exc):
    return (f"the train command needs the optional dependency {exc.name!r}: "
            "pip install 'medkernels[train]' (or -r requirements-train.txt)")


def main(argv=None):
    """Parse `argv` (default sys.argv[1:]) and run the command; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torchvision", "sklearn", "matplotlib", "tqdm", "PIL"):
            print(f"error: {_missing_dependency(exc)}", file=sys.stderr)
            return 2
        raise
