"""Image-folder datasets (one sub-folder per class) through torchvision's ImageFolder, and their loaders.

Every image is checked once when the dataset is built (PIL ``verify()``; JPEGs are also decoded at a
reduced scale, since ``verify()`` does not notice a truncated JPEG). Unreadable or truncated files are
skipped with one warning that counts them, so a single bad file does not stop a long run.
"""
import copy
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError, warn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def train_transform(image_size):
    """The official recipes' training augmentation."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size):
    """Resize the short side to image_size * 256/224, then centre-crop image_size."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def is_readable_image(path):
    """Whether PIL can read `path` to the end (header, chunks, and for JPEG the entropy-coded data)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        if fmt == "JPEG":
            with Image.open(path) as img:
                img.draft("RGB", (32, 32))
                img.load()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for a bad file
        return False
    return True


def readable_samples(samples):
    """`samples` without the unreadable images, warning once with their count and the first few."""
    good, bad = [], []
    for sample in samples:
        (good if is_readable_image(sample[0]) else bad).append(sample)
    bad = [path for path, _ in bad]
    if bad:
        shown = ", ".join(str(p) for p in bad[:3]) + (" ..." if len(bad) > 3 else "")
        warn(f"skipped {len(bad)} unreadable or truncated image(s): {shown}")
    return good


def _check_folder(root):
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise UsageError(f"data path is not a folder: {root}")
    if not any(p.is_dir() for p in root.iterdir()):
        raise UsageError(f"data folder {root} has no class folders (expected one sub-folder of images per class)")
    return root


def image_folder(root, transform=None, allow_empty_classes=False):
    """ImageFolder over `root` with unreadable images dropped; a class folder without images is refused
    unless `allow_empty_classes` (evaluation may lack a class)."""
    from torchvision import datasets

    root = _check_folder(root)
    dataset = datasets.ImageFolder(str(root), transform=transform, allow_empty=True)
    dataset.samples = readable_samples(dataset.samples)
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    empty = [name for name, n in zip(dataset.classes, counts) if n == 0]
    if empty and not allow_empty_classes:
        raise UsageError(f"class folder {root / empty[0]} has no readable images"
                         + (f" (nor {len(empty) - 1} other class folder(s))" if len(empty) > 1 else ""))
    if not dataset.samples:
        raise UsageError(f"data folder {root} has no readable images")
    return dataset


def stratified_split(targets, val_fraction, seed):
    """Seeded split of indices into (train, val), the same fraction of every class in val (at least one
    image of a class with two or more)."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-split must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = random.Random(seed)
    train, val = [], []
    targets = np.asarray(targets)
    for cls in np.unique(targets):
        idx = np.flatnonzero(targets == cls).tolist()
        rng.shuffle(idx)
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def training_datasets(root, image_size, val_fraction, seed):
    """(train, val, class names) from ``root/train`` + ``root/val``, or from one folder split by `val_fraction`."""
    root = Path(root)
    if (root / "train").is_dir():
        train = image_folder(root / "train", train_transform(image_size))
        if not (root / "val").is_dir():
            raise UsageError(f"{root} has a train/ folder but no val/ folder next to it")
        val = image_folder(root / "val", eval_transform(image_size), allow_empty_classes=True)
        if val.classes != train.classes:
            raise UsageError(f"{root}/val has classes {val.classes}, but {root}/train has {train.classes}")
        return train, val, train.classes
    full = image_folder(root, train_transform(image_size))
    train_idx, val_idx = stratified_split(full.targets, val_fraction, seed)
    if not val_idx:
        raise UsageError(f"{root} has too few images to hold out a validation split (--val-split {val_fraction})")
    val_view = copy.copy(full)
    val_view.transform = eval_transform(image_size)  # ImageFolder.__getitem__ reads .transform
    subset = torch.utils.data.Subset
    return subset(full, train_idx), subset(val_view, val_idx), full.classes


def _seed_worker(worker_id):
    # torch seeds each worker from the loader's generator; numpy and random follow it
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, workers, device, shuffle, seed=0, sampler=None):
    """DataLoader with seeded shuffling and workers, pinned memory on CUDA, and persistent workers."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def default_workers():
    """min(4, CPU count): enough to keep a small model fed without oversubscribing the machine."""
    return min(4, os.cpu_count() or 1)


def image_files(inputs):
    """The image files among `inputs` (files, or folders searched recursively), in a stable order."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UsageError(f"folder {path} has no image files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"input does not exist: {path}")
    return files
