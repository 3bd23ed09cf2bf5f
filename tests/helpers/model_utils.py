"""Helpers for the model tests: the official state_dict manifests, the fill rule and the golden logits.

The data files in tests/data are copies of ../shared/reference (the project must not depend on ../shared).
"""
import json
import math
import re
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def read_manifest(model_name):
    """Return {key: (shape tuple, torch dtype)} for the official model built with num_classes=1000."""
    entries = {}
    for line in (DATA / f"{model_name}.keys.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        entries[key] = (tuple(json.loads(shape)), _DTYPES[dtype])
    return entries


def fill_value(key, shape, dtype):
    """The deterministic fill rule of ../shared/reference/README.md for one state_dict entry."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 1)[-1]
    shape = tuple(shape)
    if leaf == "num_batches_tracked":
        value = torch.zeros(shape, dtype=torch.long)
    elif leaf == "running_var":
        value = 1.0 + 0.5 * torch.rand(shape, generator=g)
    elif leaf == "A_logs":
        n = shape[-1]
        value = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(shape) + 0.1 * torch.randn(
            shape, generator=g
        )
    elif leaf == "Ds" or (leaf == "weight" and len(shape) == 1):
        value = 1.0 + 0.1 * torch.randn(shape, generator=g)
    else:
        value = 0.02 * torch.randn(shape, generator=g)
    return value.to(dtype)


def fill_model(model):
    """Load the fill-rule weights into `model` with strict=True (relative_position_index is left as built)."""
    state = model.state_dict()
    filled = {}
    for key, tensor in state.items():
        if key.rsplit(".", 1)[-1] == "relative_position_index":
            filled[key] = tensor
        else:
            filled[key] = fill_value(key, tensor.shape, tensor.dtype)
    model.load_state_dict(filled, strict=True)
    return model


def golden_case(model_name):
    cases = json.loads((DATA / "golden.json").read_text())["cases"]
    (case,) = [c for c in cases if c["model"] == model_name]
    return case


def golden_input():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1234))


def num_params(manifest):
    return sum(math.prod(shape) for key, (shape, _) in manifest.items())


def header_param_count(model_name):
    """The parameter count in the manifest's header line (parameters only, no buffers)."""
    header = (DATA / f"{model_name}.keys.tsv").read_text().splitlines()[0]
    match = re.search(r"(\d+) parameters", header)
    assert match, f"no parameter count in the header of {model_name}.keys.tsv: {header!r}"
    return int(match.group(1))


def assert_matches_manifest(model, model_name):
    """The model's state_dict has exactly the official keys (in order), shapes and dtypes, built on CPU."""
    manifest = read_manifest(model_name)
    state = model.state_dict()
    assert set(state) == set(manifest), (
        f"missing: {sorted(set(manifest) - set(state))[:10]}, unexpected: {sorted(set(state) - set(manifest))[:10]}"
    )
    assert list(state) == list(manifest), "state_dict key order differs from the official model"
    for key, (shape, dtype) in manifest.items():
        assert tuple(state[key].shape) == shape, f"{key}: shape {tuple(state[key].shape)} != {shape}"
        assert state[key].dtype == dtype, f"{key}: dtype {state[key].dtype} != {dtype}"
        assert state[key].device.type == "cpu", f"{key} was built on {state[key].device}"
    assert sum(t.numel() for t in state.values()) == num_params(manifest)
    assert sum(p.numel() for p in model.parameters()) == header_param_count(model_name)
