"""load_official_checkpoint: the layouts official training code saves, strict key checking, weights_only."""
import pytest
import torch

from medkernels.models import load_official_checkpoint, medmamba_t
from medkernels.models.checkpoint import CheckpointMismatchError

from helpers.model_utils import fill_model


@pytest.fixture(scope="module")
def filled_state():
    return fill_model(medmamba_t(num_classes=7)).state_dict()


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "ddp-prefix"])
def test_loads_each_layout(tmp_path, filled_state, layout):
    state = {f"module.{k}": v for k, v in filled_state.items()} if layout == "ddp-prefix" else filled_state
    obj = {layout: state, "epoch": 3} if layout in ("model", "state_dict") else state
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = load_official_checkpoint(medmamba_t(num_classes=7), str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in filled_state.items())


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, filled_state):
    state = dict(filled_state)
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(5, 768)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(medmamba_t(num_classes=7), str(path))
    message = str(err.value)
    assert "missing keys (1): head.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.weight: checkpoint (5, 768) vs model (7, 768)" in message


def test_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _NotAllowed()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_official_checkpoint(medmamba_t(num_classes=7), str(path))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointMismatchError, match="holds no state_dict"):
        load_official_checkpoint(medmamba_t(num_classes=7), str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_checkpoint(medmamba_t(num_classes=7), str(tmp_path / "nope.pth"))


class _NotAllowed:
    pass
