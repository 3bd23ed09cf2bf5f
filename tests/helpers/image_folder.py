"""Small synthetic image folders for the train CLI tests: one solid colour per class, with pixel noise."""
import numpy as np
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (210, 200, 30)}


def make_image_folder(root, per_class=8, size=40, classes=("red", "green", "blue"), seed=0):
    """Write `per_class` PNGs per class under root/<class>/ and return root."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.asarray(COLOURS[name], dtype=np.int16) + rng.integers(-25, 26, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.png")
    return root


def make_split_folders(root, per_class=(8, 4), seed=0, **kwargs):
    """root/train and root/val image folders (per_class images in each, different noise)."""
    make_image_folder(root / "train", per_class=per_class[0], seed=seed, **kwargs)
    make_image_folder(root / "val", per_class=per_class[1], seed=seed + 1000, **kwargs)
    return root
