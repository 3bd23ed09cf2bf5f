"""Where and how a command runs: device, mixed precision, kernel backend, seeds and DDP under torchrun."""
import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError


@dataclass
class Dist:
    """The process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world > 1

    @property
    def is_main(self):
        return self.rank == 0


def start_distributed(device_choice):
    """Join the torchrun job described by the environment (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device_choice != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def stop_distributed(d):
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(choice, d):
    """torch.device for --device auto/cpu/cuda (this process's GPU under torchrun)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", d.local_rank)


def check_amp(amp, device):
    """UsageError for a precision the device cannot autocast to."""
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none")


def autocast(amp, device):
    """The autocast context of --amp (a no-op for none)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(amp, device):
    """GradScaler, active for fp16 only (bf16 keeps fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


@contextlib.contextmanager
def backend_context(name):
    """medkernels.use_backend(name) around the block, an unavailable backend being a UsageError."""
    import medkernels

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(medkernels.use_backend(name))  # checks availability on entry
    except (medkernels.BackendUnavailableError, ValueError) as exc:
        raise UsageError(f"--backend {name}: {exc}") from None
    with stack:
        yield


def seed_everything(seed):
    """Seed python, numpy and torch; the loaders' generators and workers are seeded in data.make_loader."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_image_size(model_name, image_size):
    """Both HiFuse and MedMamba downsample by 32 in four stages, so the input side must be a multiple of 32."""
    if image_size < 32 or image_size % 32:
        raise UsageError(f"--image-size {image_size}: {model_name} needs a multiple of 32 (e.g. 224)")
