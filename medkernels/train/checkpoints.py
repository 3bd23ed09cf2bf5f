"""Run checkpoints (best.pt, last.pt) and initialising from an official checkpoint."""
import os
import tempfile
from pathlib import Path

import torch

from .errors import UsageError

MODEL_NAMES = ("hifuse_tiny", "hifuse_small", "hifuse_base", "medmamba_t", "medmamba_s", "medmamba_b")

# Keys whose shape depends on the class count. HiFuse also keeps the official global-branch `head`,
# which its forward pass never uses, beside the `conv_head` classifier.
_CLASSIFIER_KEYS = {
    "hifuse": ("conv_head.weight", "conv_head.bias", "head.weight", "head.bias"),
    "medmamba": ("head.weight", "head.bias"),
}


def classifier_keys(model_name):
    """State-dict keys of the classifier head of `model_name`."""
    return _CLASSIFIER_KEYS[model_name.split("_")[0]]


def build_model(model_name, num_classes):
    """The medkernels.models network `model_name` with `num_classes` outputs."""
    from medkernels import models

    if model_name not in MODEL_NAMES:
        raise UsageError(f"unknown model {model_name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return getattr(models, model_name)(num_classes=num_classes)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path):
    """The dict saved in `path` (weights only); UsageError when it is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint file does not exist: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged file
        raise UsageError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return obj


def read_run_checkpoint(path):
    """A checkpoint written by `medkernels.train train` (with model name and class names)."""
    ckpt = read_checkpoint(path)
    missing = [k for k in ("model", "model_name", "classes") if k not in ckpt]
    if missing:
        raise UsageError(f"{path} is not a medkernels.train checkpoint (no {', '.join(missing)}); "
                         "an official checkpoint goes to `train --init-from`")
    return ckpt


def check_same_run(ckpt, path, model_name, classes):
    """UsageError unless checkpoint `ckpt` was trained as `model_name` on `classes`."""
    if model_name is not None and ckpt["model_name"] != model_name:
        raise UsageError(f"checkpoint {path} is a {ckpt['model_name']} model, not --model {model_name}")
    if classes is not None and list(ckpt["classes"]) != list(classes):
        raise UsageError(f"checkpoint {path} was trained on classes {list(ckpt['classes'])}, "
                         f"but the data has {list(classes)}")


def _state_dict(obj):
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def init_from_official(model, model_name, path):
    """Load an official (or medkernels.train) checkpoint into `model`; with another class count, load all
    but the classifier head and say so. Returns the message to print."""
    from medkernels.models import load_official_checkpoint
    from medkernels.models.checkpoint import CheckpointMismatchError

    state = _state_dict(read_checkpoint(path))
    head = state.get(classifier_keys(model_name)[0])
    num_classes = model.state_dict()[classifier_keys(model_name)[0]].shape[0]
    ckpt_classes = head.shape[0] if isinstance(head, torch.Tensor) and head.dim() == 2 else num_classes
    source = model if ckpt_classes == num_classes else build_model(model_name, ckpt_classes)
    try:
        load_official_checkpoint(source, str(path))
    except CheckpointMismatchError as exc:
        raise UsageError(f"--init-from checkpoint does not fit {model_name}: {str(exc)[:300]}") from None
    if source is model:
        return f"initialised from {path}"
    kept = {k: v for k, v in source.state_dict().items() if k not in classifier_keys(model_name)}
    model.load_state_dict(kept, strict=False)
    return f"initialised from {path}; head replaced: checkpoint has {ckpt_classes} classes, data has {num_classes}"
