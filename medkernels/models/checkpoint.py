"""Loading checkpoints saved by the official HiFuse and MedMamba training code."""
import os

import torch


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""


def _state_dict_of(obj, path):
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict):
                return inner
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointMismatchError(
        f"{path} holds no state_dict: expected a dict of tensors, or one under 'model' or 'state_dict'"
    )


def load_official_checkpoint(model, path, map_location="cpu"):
    """Load an official ``.pth`` (a bare state_dict, or one under ``model``/``state_dict``) into `model`.

    Reads with ``weights_only=True``; a ``module.`` prefix (DataParallel/DDP) is stripped. Any missing or
    unexpected key or shape mismatch raises CheckpointMismatchError listing them. Returns the model.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    state = _state_dict_of(torch.load(path, map_location=map_location, weights_only=True), path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                parts.append(f"{title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointMismatchError(f"{path} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
