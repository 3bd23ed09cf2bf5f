"""Distributed training: one DDP step on 2 gloo processes matches single-process training on the same shards,
and examples/train.py trains under torchrun and saves checkpoints that load back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.ddp_step import make_batch, make_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _torchrun(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("name", ["medmamba_t", "hifuse_tiny"])
def test_ddp_step_matches_single_process_on_the_same_shards(tmp_path, name):
    out = tmp_path / "ddp.pt"
    _torchrun([ROOT / "tests" / "helpers" / "ddp_step.py", "--model", name, "--out", out])
    ddp = torch.load(out, weights_only=True)
    # DDP averages the ranks' gradients of their shard's mean loss; BatchNorm sees each shard's own statistics
    # (no SyncBatchNorm), so the single-process equivalent accumulates the two shards' gradients.
    torch.set_num_threads(1)
    model = make_model(name, 3)
    x, y = make_batch(4, 32, 3)
    losses = []
    for shard in (slice(0, 2), slice(2, 4)):
        loss = F.cross_entropy(model(x[shard]), y[shard]) / 2
        loss.backward()
        losses.append(2 * loss.detach())
    torch.testing.assert_close(ddp["losses"], torch.stack(losses), rtol=1e-5, atol=1e-6)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ddp["grads"]) == set(expected)
    for n, g in expected.items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_example_training_script_under_torchrun_saves_loadable_checkpoints(tmp_path):
    common = ["examples/train.py", "--model", "medmamba_t", "--image-size", "32", "--train-size", "8",
              "--batch-size", "2", "--out", tmp_path]
    first = _torchrun(common + ["--epochs", "1"])
    assert "epoch 0:" in first and "reloads exactly" in first
    resumed = _torchrun(common + ["--epochs", "2", "--resume"])
    assert "epoch 0:" not in resumed and "epoch 1:" in resumed and "reloads exactly" in resumed
    from medkernels import models

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    models.medmamba_t(num_classes=4).load_state_dict(state["model"])  # strict
