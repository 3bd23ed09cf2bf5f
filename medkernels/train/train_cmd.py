"""`train`: AdamW with a warm-up + cosine schedule, checkpoints, history and curves; DDP under torchrun."""
import json
from pathlib import Path

import torch

from . import checkpoints as ck
from .data import make_loader, training_datasets
from .errors import UsageError
from .loop import all_reduce_sums, train_epoch, validation_sums, warmup_cosine
from .plots import plot_curves
from .runtime import (backend_context, check_amp, check_image_size, grad_scaler, pick_device, seed_everything,
                      start_distributed, stop_distributed)


def run_train(args):
    """Entry point of the train command; returns the exit code."""
    _check_options(args)
    dist = start_distributed(args.device)
    try:
        with backend_context(args.backend):
            _train(args, dist)
    finally:
        stop_distributed(dist)
    return 0


def _check_options(args):
    check_image_size(args.model, args.image_size)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or args.workers < 0:
        raise UsageError("--lr must be positive; --weight-decay, --warmup-epochs and --workers not negative")
    if args.resume and args.init_from:
        raise UsageError("--resume and --init-from exclude each other (a resumed run has its own weights)")


def _say(dist, message):
    if dist.is_main:
        print(message, flush=True)


def _resume_checkpoint(args):
    path = Path(args.out) / "last.pt"
    if not path.is_file():
        raise UsageError(f"--resume: there is no {path} to resume from")
    return path, ck.read_run_checkpoint(path)


def _model(args, classes, dist, device, resume):
    model = ck.build_model(args.model, len(classes))
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif args.init_from:
        _say(dist, ck.init_from_official(model, args.model, args.init_from))
    model.to(device)
    if not dist.enabled:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    # HiFuse keeps the official global-branch norm/head, which its forward pass never uses
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=args.model.startswith("hifuse"))
    return model, net


def _loaders(args, train_set, val_set, dist, device):
    sampler = None
    if dist.enabled:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank,
                                                      shuffle=True, seed=args.seed)
        # a strided shard without the sampler's padding, so the summed accuracy counts each image once
        val_set = torch.utils.data.Subset(val_set, range(dist.rank, len(val_set), dist.world))
    train = make_loader(train_set, args.batch_size, args.workers, device, True, args.seed + dist.rank, sampler)
    val = make_loader(val_set, args.batch_size, args.workers, device, False)
    return train, val, sampler


def _plain_args(args):
    # only plain values, so that the checkpoint loads with weights_only=True
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _train(args, dist):
    device = pick_device(args.device, dist)
    check_amp(args.amp, device)
    resume_path, resume = _resume_checkpoint(args) if args.resume else (None, None)
    seed_everything(args.seed)
    train_set, val_set, classes = training_datasets(args.data, args.image_size, args.val_split, args.seed)
    if args.batch_size * dist.world > len(train_set):
        raise UsageError(f"--batch-size {args.batch_size} (x {dist.world} process(es)) is larger than the "
                         f"{len(train_set)} training images; use a smaller batch")
    if resume is not None:
        ck.check_same_run(resume, resume_path, args.model, classes)
    model, net = _model(args, classes, dist, device, resume)
    train_loader, val_loader, sampler = _loaders(args, train_set, val_set, dist, device)
    # fused: one kernel for all parameters (on a 2-core CPU 79 ms a step for HiFuse-T instead of the default
    # loop's 385 ms; benchmarks/NOTES.md)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(args.warmup_epochs * steps), args.epochs * steps))
    scaler = grad_scaler(args.amp, device)
    history, start_epoch, best = [], 0, -1.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["scaler"] and scaler.is_enabled():  # a disabled scaler saves {} and loads nothing
            scaler.load_state_dict(resume["scaler"])
        start_epoch, history, best = resume["epoch"], list(resume["history"]), resume["best_val_acc"]
        if start_epoch >= args.epochs:
            raise UsageError(f"{resume_path} has already trained {start_epoch} epoch(s); "
                             f"pass --epochs larger than {start_epoch} to go on")
        _say(dist, f"resuming from {resume_path} at epoch {start_epoch + 1}")
    out = Path(args.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _say(dist, f"{args.model}: {len(classes)} classes, {len(train_set)} training and {len(val_set)} validation "
               f"images, {dist.world} process(es) on {device}, amp {args.amp}")
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t_loss, t_correct, t_seen, seconds = train_epoch(
            net, train_loader, optimizer, scheduler, scaler, args.amp, device,
            f"epoch {epoch + 1}/{args.epochs}", dist.is_main)
        t_loss, t_correct, t_seen = all_reduce_sums([t_loss, t_correct, t_seen], device, dist.enabled)
        v_loss, v_correct, v_seen = all_reduce_sums(validation_sums(model, val_loader, args.amp, device),
                                                    device, dist.enabled)
        entry = {"epoch": epoch + 1, "train_loss": t_loss / t_seen, "train_acc": t_correct / t_seen,
                 "val_loss": v_loss / v_seen, "val_acc": v_correct / v_seen,
                 "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": t_seen / seconds}
        history.append(entry)
        improved = entry["val_acc"] > best
        best = max(best, entry["val_acc"])
        if dist.is_main:
            _save(out, model, optimizer, scheduler, scaler, epoch + 1, classes, args, history, best, improved)
        _say(dist, f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.4f} | "
                   f"val loss {entry['val_loss']:.4f} acc {entry['val_acc']:.4f}" + (" (best)" if improved else ""))
    if dist.is_main:
        _write_history(out, args.model, classes, history, best)
        _say(dist, f"wrote {out / 'last.pt'}, {out / 'best.pt'}, {out / 'history.json'} and {out / 'curves.png'}")


def _save(out, model, optimizer, scheduler, scaler, epoch, classes, args, history, best, improved):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "classes": list(classes),
        "model_name": args.model,
        "args": _plain_args(args),
        "history": history,
        "best_val_acc": best,
    }
    ck.save_atomic(state, out / "last.pt")
    if improved:
        ck.save_atomic(state, out / "best.pt")


def _write_history(out, model_name, classes, history, best):
    record = {"model": model_name, "classes": list(classes), "best_val_acc": best, "history": history}
    tmp = out / ".history.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "history.json")
    plot_curves(history, out / "curves.png")
