"""One DDP training step (run by tests/test_distributed.py under torchrun, gloo, CPU): every rank builds the
same model, takes its shard of a fixed batch, and rank 0 saves the all-reduced gradients and the losses."""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from medkernels import models


def make_batch(batch, image_size, num_classes):
    g = torch.Generator().manual_seed(123)
    return torch.randn(batch, 3, image_size, image_size, generator=g), torch.randint(0, num_classes, (batch,), generator=g)


def make_model(name, num_classes):
    torch.manual_seed(0)
    return getattr(models, name)(num_classes=num_classes, drop_path_rate=0.0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(args.model, args.num_classes)
    net = DistributedDataParallel(model, find_unused_parameters=args.model.startswith("hifuse"))
    x, y = make_batch(args.batch, args.image_size, args.num_classes)
    shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    loss = F.cross_entropy(net(x[shard]), y[shard])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        grads = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
        torch.save({"grads": grads, "losses": torch.stack(losses), "world": world}, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
