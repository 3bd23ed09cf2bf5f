"""`evaluate` (the papers' metrics on a split folder) and `predict` (top-k classes of image files)."""
import csv
import json
from pathlib import Path

import torch

from . import checkpoints as ck
from .data import eval_transform, image_files, image_folder, is_readable_image, make_loader
from .errors import UsageError, warn
from .loop import predict_logits
from .metrics import compute_metrics, format_report, roc_curves
from .plots import plot_confusion_matrix, plot_roc
from .runtime import backend_context, check_amp, check_image_size, pick_device, Dist


def _load_model(args):
    """(model on its device, checkpoint, device, image size) for --checkpoint."""
    ckpt = ck.read_run_checkpoint(args.checkpoint)
    ck.check_same_run(ckpt, args.checkpoint, getattr(args, "model", None), None)
    device = pick_device(args.device, Dist())
    check_amp(args.amp, device)
    image_size = args.image_size or ckpt.get("args", {}).get("image_size", 224)
    check_image_size(ckpt["model_name"], image_size)
    model = ck.build_model(ckpt["model_name"], len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UsageError(f"{args.checkpoint}: weights do not fit {ckpt['model_name']}: {str(exc)[:200]}") from None
    return model.to(device), ckpt, device, image_size


def run_evaluate(args):
    """Entry point of the evaluate command; returns the exit code."""
    with backend_context(args.backend):
        model, ckpt, device, image_size = _load_model(args)
        classes = list(ckpt["classes"])
        dataset = image_folder(args.data, eval_transform(image_size), allow_empty_classes=True)
        unknown = [c for c in dataset.classes if c not in classes]
        if unknown:
            raise UsageError(f"{args.data} has class folder(s) {', '.join(unknown)} that {args.checkpoint} "
                             f"was not trained on (its classes: {', '.join(classes)})")
        # the split may lack some class folders: map its indices onto the checkpoint's
        dataset.target_transform = [classes.index(c) for c in dataset.classes].__getitem__
        loader = make_loader(dataset, args.batch_size, args.workers, device, shuffle=False)
        labels, logits = predict_logits(model, loader, args.amp, device)
    probs = torch.softmax(logits, dim=1).numpy()
    metrics = compute_metrics(labels.numpy(), probs, classes)
    print(format_report(metrics))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{Path(args.data).name}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(args.checkpoint), "data": str(args.data), "model": ckpt["model_name"], **metrics}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_roc(roc_curves(labels.numpy(), probs), metrics, out / "roc.png")
    print(f"wrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'} and {out / 'roc.png'}")
    return 0


class _Files(torch.utils.data.Dataset):
    """Image files -> (tensor, index) with the evaluation transform."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(str(self.files[i]))), i


def run_predict(args):
    """Entry point of the predict command; returns the exit code."""
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")
    files = image_files(args.inputs)
    readable = [f for f in files if is_readable_image(f)]
    if len(readable) < len(files):
        warn(f"skipped {len(files) - len(readable)} unreadable or truncated image(s)")
    if not readable:
        raise UsageError("none of the inputs is a readable image")
    with backend_context(args.backend):
        model, ckpt, device, image_size = _load_model(args)
        loader = make_loader(_Files(readable, eval_transform(image_size)), args.batch_size, args.workers, device,
                             shuffle=False)
        _, logits = predict_logits(model, loader, args.amp, device)
    classes = list(ckpt["classes"])
    k = min(args.topk, len(classes))
    top_p, top_i = torch.softmax(logits, dim=1).topk(k, dim=1)
    rows = [[str(f)] + [item for j in range(k) for item in (classes[top_i[n, j]], f"{top_p[n, j].item():.4f}")]
            for n, f in enumerate(readable)]
    header = ["image"] + [item for j in range(1, k + 1) for item in (f"class_{j}", f"prob_{j}")]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
        print(f"wrote {len(rows)} prediction(s) to {args.csv}")
    else:
        _print_table(header, rows)
    return 0


def _print_table(header, rows):
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
