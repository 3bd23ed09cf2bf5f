"""Train a medkernels network on a small synthetic image-classification set, on one or several processes.

    python examples/train.py --model medmamba_t --epochs 2 --out runs/medmamba
    torchrun --nproc_per_node=2 examples/train.py --model hifuse_tiny --out runs/hifuse
    torchrun --nproc_per_node=8 examples/train.py --model medmamba_t --image-size 224 --amp   # GPUs, bf16 autocast

Several processes train with DistributedDataParallel (NCCL on GPUs, gloo on CPUs), each on its shard of
every batch.  Rank 0 writes ``<out>/checkpoint.pt`` (model, optimizer, epoch) after every epoch; ``--resume``
continues from it, and at the end the saved weights are loaded into a fresh model to check that they give
the trained model's outputs.  The data are synthetic so the script runs anywhere: each class is a bright
square at its own place on noise, which the networks learn within a few epochs.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import medkernels
from medkernels import models

MODELS = ("hifuse_tiny", "hifuse_small", "hifuse_base", "medmamba_t", "medmamba_s", "medmamba_b")


class SyntheticSquares(Dataset):
    """`size` images (3, image_size, image_size): noise plus a bright square whose position encodes the label."""

    def __init__(self, size, num_classes, image_size, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        self.images = 0.5 * torch.randn(size, 3, image_size, image_size, generator=g)
        side = max(2, image_size // 4)
        per_row = max(1, (image_size - side) // side + 1)
        for i, label in enumerate(self.labels.tolist()):
            r, c = divmod(label % (per_row * per_row), per_row)
            self.images[i, :, r * side:(r + 1) * side, c * side:(c + 1) * side] += 2.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="medmamba_t")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64, help="a multiple of 32")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backend", default="auto", choices=("auto", "ref", "cpu", "cuda", "triton"))
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CPU or GPU)")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup_distributed():
    """(rank, world_size, device); starts the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(name, num_classes, device):
    return getattr(models, name)(num_classes=num_classes).to(device)


def save_checkpoint(path, model, optimizer, epoch):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    model.train()
    return correct / max(1, total)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)
    medkernels.set_backend(args.backend)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    data = SyntheticSquares(args.train_size, args.num_classes, args.image_size, seed=args.seed)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)

    model = build_model(args.model, args.num_classes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start_epoch = 0
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    net = model
    if world > 1:
        # HiFuse has parameters its forward never uses (the official fu2-fu4 keep norm2/W): DDP must look for them
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=args.model.startswith("hifuse"))

    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0, losses = time.perf_counter(), []
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            save_checkpoint(ckpt_path, model, optimizer, epoch)
            mean = sum(losses) / max(1, len(losses))
            print(f"epoch {epoch}: loss {mean:.4f}, {time.perf_counter() - t0:.1f}s on {world} process(es)", flush=True)
        if world > 1:
            dist.barrier()

    if rank == 0:
        # the checkpoint must reproduce the trained model
        fresh = build_model(args.model, args.num_classes, device)
        fresh.load_state_dict(torch.load(ckpt_path, map_location=device, weights_only=True)["model"])
        fresh.eval()
        model.eval()
        x = data.images[: args.batch_size].to(device)
        with torch.no_grad():
            same = torch.equal(fresh(x), model(x))
        accuracy = evaluate(model, DataLoader(data, batch_size=args.batch_size), device)
        print(f"checkpoint {ckpt_path} reloads {'exactly' if same else 'WITH DIFFERENT OUTPUTS'}; "
              f"train accuracy {accuracy:.2f}", flush=True)
        if not same:
            raise SystemExit("the saved checkpoint does not reproduce the trained model")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
