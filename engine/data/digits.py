"""The embedded default data set: "cluttered digits", generated offline in seconds.

Real handwritten digits (the 1,797 8x8 scans that ship inside scikit-learn, ``load_digits``) are
upscaled and pasted on small colour canvases among clutter: fragments of other digits, as in
cluttered MNIST. The clutter is what makes *where* the model looks matter. Each digit's bounding
box is recorded, so patch precision, recall and localization can be measured.

- single-label: one digit per canvas, label = its class;
- multi-label: 1-3 digits of distinct classes, multi-hot label, one box per digit.

The source digits are split once (seeded) into train and test writers' scans, so test canvases
never reuse a training scan. Everything is deterministic given the seed, and cached on disk.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.base import Augment, ImageSet, pack_boxes
from engine.data.readers import Decoded
from engine.data.registry import register_dataset

GENERATOR_VERSION = 1
CLASSES = [str(d) for d in range(10)]
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TEST_SOURCE_FRACTION = 0.3


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digit scans (values 0-16) and their labels, read from the file
    ``sklearn.datasets.load_digits`` reads, without importing scikit-learn: importing
    ``sklearn.datasets`` costs the app server about 135 MiB, kept for as long as it runs."""
    spec = importlib.util.find_spec("sklearn")  # locates the package; does not import it
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    path = folder / "datasets" / "data" / "digits.csv.gz" if folder else None
    if path is None or not path.is_file():  # a scikit-learn that keeps its data elsewhere
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _sources(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The sklearn digits as alpha maps in [0, 1], split into train / test scans."""
    scans, labels = _sklearn_digits()
    images = (scans / 16.0).astype(np.float32)
    targets = labels.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = round(len(images) * TEST_SOURCE_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], targets[train]), "test": (images[test], targets[test])}


def _rendered(images: np.ndarray, sizes: list[int]) -> dict[int, np.ndarray]:
    """Each source digit upscaled to every render size (bilinear)."""
    src = torch.from_numpy(images).unsqueeze(1)
    return {s: F.interpolate(src, size=(s, s), mode="bilinear", align_corners=False)
            .squeeze(1).clamp(0, 1).numpy() for s in sizes}


def _paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    a = alpha[:, :, None]
    region *= 1.0 - a
    region += a * colour


def _tight_box(alpha: np.ndarray, y: int, x: int, level: float = 0.25
               ) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(alpha > level)
    if len(ys) == 0:
        return None
    return (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def generate(split: str, count: int, canvas: int, multilabel: bool, seed: int) -> ImageSet:
    """Generate ``count`` canvases of size ``canvas`` from the ``split`` scans."""
    if canvas < 16:
        raise ValueError(f"input_size for digits must be >= 16; got {canvas}")
    images, targets = _sources(seed)[split]
    scale = canvas / 32.0
    lo, hi = (10, 13) if multilabel else (12, 16)
    sizes = list(range(max(4, round(lo * scale)), round(hi * scale) + 1))
    rendered = _rendered(images, sizes)
    by_class = [np.flatnonzero(targets == c) for c in range(10)]
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, int(multilabel), canvas])
    n_clutter = max(3, round(5 * scale * scale))

    out = rng.normal(0.0, 0.03, (count, canvas, canvas, 3)).astype(np.float32)
    out += rng.uniform(0.0, 0.15, (count, 1, 1, 3)).astype(np.float32)
    labels = np.zeros((count, 10), dtype=np.float32) if multilabel else np.empty(count, np.int64)
    boxes: list[list[tuple[float, float, float, float, float]]] = []
    for i in range(count):
        img = out[i]
        for _ in range(n_clutter):  # fragments of random digits, drawn first (under the digits)
            s = sizes[rng.integers(len(sizes))]
            src = rendered[s][rng.integers(len(images))]
            f = int(rng.integers(max(3, s // 3), max(4, s // 2) + 1))
            fy, fx = rng.integers(0, s - f + 1, 2)
            y, x = rng.integers(0, canvas - f + 1, 2)
            _paste(img, src[fy:fy + f, fx:fx + f], rng.uniform(0.3, 0.9, 3), y, x)
        wanted = int(rng.integers(1, 4)) if multilabel else 1
        classes = rng.permutation(10)[:wanted]
        placed: list[tuple[int, int, int, int]] = []
        image_boxes = []
        for c in classes:
            for _ in range(20):  # rejection sampling: digits of one canvas barely overlap
                s = sizes[rng.integers(len(sizes))]
                src = rendered[s][by_class[c][rng.integers(len(by_class[c]))]]
                y, x = rng.integers(0, canvas - s + 1, 2)
                box = _tight_box(src, int(y), int(x))
                if box is not None and all(_iou(box, other) < 0.05 for other in placed):
                    break
            else:
                continue
            colour = rng.uniform(0.6, 1.0, 3)
            colour[rng.integers(3)] = 1.0
            _paste(img, src, colour, int(y), int(x))
            placed.append(box)
            image_boxes.append((float(c), *map(float, box)))
            if multilabel:
                labels[i, c] = 1.0
            else:
                labels[i] = c
        boxes.append(image_boxes)

    pixels = torch.from_numpy(np.clip(out, 0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    box_data, box_offsets = pack_boxes(boxes)
    name = "digits_multilabel" if multilabel else "digits"
    return ImageSet(name, split, pixels.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                    CLASSES, multilabel, MEAN, STD, box_data, box_offsets)


# ----------------------------------------------------------------------------------------------
# Registration: the embedded default, single- and multi-label

DIGIT_COUNTS = {"train": 12_000, "test": 3_000}


def digit_count(cfg, split: str) -> int:
    given = cfg.train_size if split == "train" else cfg.test_size
    return given or DIGIT_COUNTS[split]


def _generated(cfg, split: str) -> dict:
    """What a generated split's pixels depend on (the cache key)."""
    return {"seed": cfg.seed, "count": digit_count(cfg, split), "gen": GENERATOR_VERSION}


def _register(name: str, multilabel: bool, description: str) -> None:
    @register_dataset(name, description=description, multilabel=multilabel, native_size=32,
                      default_preset="live",
                      mean=MEAN, std=STD, augment=Augment(crop_pad=2, flip=False),
                      has_boxes=True, locate=lambda cfg: None, generated=_generated)
    def read(cfg, folder, split, opts) -> Decoded:
        data = generate(split, digit_count(cfg, split), opts.size, multilabel, cfg.seed)
        return Decoded(data.images, data.targets, data.classes, data.box_data, data.box_offsets)


_register("digits", False, "Embedded default: a cluttered handwritten digit, boxes")
_register("digits_multilabel", True,
          "Embedded default: 1-3 cluttered handwritten digits, multi-label, boxes")
