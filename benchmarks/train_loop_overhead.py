"""What `python -m medkernels.train` adds over a bare training step: per-step time of the bare step (one batch
reused, no data loading) and of the tool's epoch loop on an image folder at the same model, size and batch,
timed in alternating rounds so that drift on a shared machine falls on both.

    .venv/bin/python benchmarks/train_loop_overhead.py [--model hifuse_tiny] [--size 64] [--batch 8]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.image_folder import make_image_folder  # noqa: E402

from medkernels import models  # noqa: E402
from medkernels.train.data import image_folder, make_loader, train_transform  # noqa: E402
from medkernels.train.loop import train_epoch, warmup_cosine  # noqa: E402
from medkernels.train.runtime import grad_scaler  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hifuse_tiny")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = getattr(models, args.model)(num_classes=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(0, 10_000))
    scaler = grad_scaler("none", device)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 3, (args.batch,))

    def bare():
        t = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        return (time.perf_counter() - t) / args.steps

    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp), per_class=args.steps * args.batch // 3 + 1, size=args.size)
        loader = make_loader(image_folder(root, train_transform(args.size)), args.batch, args.workers, device,
                             shuffle=True)

        def loop():
            _, _, _, seconds = train_epoch(model, loader, opt, sched, scaler, "none", device, "round", show=False)
            return seconds / len(loader)

        bare(), loop()  # warm-up: first-call allocations, worker start-up
        times = {"bare step": [], "train loop": []}
        for _ in range(args.rounds):
            times["bare step"].append(bare())
            times["train loop"].append(loop())
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/step (rounds: {', '.join(f'{t:.3f}' for t in times[k])})")
    print(f"the loop adds {100 * (med['train loop'] / med['bare step'] - 1):+.1f}% per step "
          f"({args.model}, {args.size}x{args.size}, batch {args.batch}, {args.workers} workers)")


if __name__ == "__main__":
    main()
