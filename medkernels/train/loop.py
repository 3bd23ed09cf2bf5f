"""One training epoch, one inference pass, and the learning-rate schedule."""
import math
import time

import torch
import torch.nn.functional as F

from .runtime import autocast


def warmup_cosine(warmup_steps, total_steps):
    """LambdaLR factor per optimizer step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def all_reduce_sums(values, device, enabled):
    """Sum a list of numbers over the DDP processes (a no-op outside DDP)."""
    if not enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train_epoch(net, loader, optimizer, scheduler, scaler, amp, device, desc, show, log_every=10):
    """Train one epoch; returns [loss sum, correct, images, seconds] of this process.

    Loss and accuracy accumulate on the device and are read back only every `log_every` steps, so the
    progress bar does not force a GPU sync per step.
    """
    from tqdm import tqdm

    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not show, unit="batch", dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(amp, device):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if show and (step % log_every == 0 or step == len(loader) - 1):
            rate = seen / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", img_s=f"{rate:.1f}", refresh=False)
    bar.close()
    return [loss_sum.item(), float(correct.item()), float(seen), time.perf_counter() - start]


@torch.no_grad()
def predict_logits(model, loader, amp, device):
    """(labels, float32 logits) on the CPU for every batch of `loader`."""
    model.eval()
    labels, logits = [], []
    for x, y in loader:
        with autocast(amp, device):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
    if not logits:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
    return torch.cat(labels), torch.cat(logits)


def validation_sums(model, loader, amp, device):
    """[loss sum, correct, images] of this process's validation shard."""
    labels, logits = predict_logits(model, loader, amp, device)
    if len(labels) == 0:
        return [0.0, 0.0, 0.0]
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    return [loss, float((logits.argmax(1) == labels).sum().item()), float(len(labels))]
