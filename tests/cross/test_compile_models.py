"""torch.compile(model, fullgraph=True) on CPU with the cpu backend, for all six networks: no graph breaks from
medkernels ops, the eager outputs, and a training step with the eager gradients.

The graphs are captured with AOT autograd (backend "aot_eager": dynamo and AOT autograd trace forward and backward
through the custom ops' fake kernels and autograd formulas as they do for inductor, without inductor's C++ code
generation, which takes minutes per network on a 2-core CI machine)."""
import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels import models

NAMES = ["hifuse_tiny", "hifuse_small", "hifuse_base", "medmamba_t", "medmamba_s", "medmamba_b"]


def _fresh(name):
    torch.manual_seed(0)
    return getattr(models, name)(num_classes=3, drop_path_rate=0.0)


def _train_grads(forward, module, x, y):
    module.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_fullgraph_compile_matches_eager(name):
    if medkernels.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is unavailable")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 2])
    with medkernels.use_backend("cpu"):
        eager, compiled_model = _fresh(name), _fresh(name)
        compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
        eager.eval(), compiled_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
        eager.train(), compiled_model.train()
        loss_e, grads_e = _train_grads(eager, eager, x, y)
        loss_c, grads_c = _train_grads(compiled, compiled_model, x, y)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-5, msg=n)
