"""Every registered data set keeps the same contract: a tiny sample in its own file layout loads
with the right shapes, labels and boxes. A data set registered without a sample writer here
fails this test, so every reader is read by at least one test (cifar100 and a real SVHN .mat
file included)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.data import dataset_spec, list_datasets, load_split

RNG = np.random.default_rng(0)


def _pickle(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))


def _cifar_rows(n: int) -> np.ndarray:
    return RNG.integers(0, 255, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    labels = {"train": [0, 1, 2, 3, 4, 5], "test": [9, 8, 7]}
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    _pickle(folder / "data_batch_1", {b"data": _cifar_rows(3), b"labels": labels["train"][:3]})
    _pickle(folder / "data_batch_2", {b"data": _cifar_rows(3), b"labels": labels["train"][3:]})
    _pickle(folder / "test_batch", {b"data": _cifar_rows(3), b"labels": labels["test"]})
    return {"labels": labels, "classes": [f"c{i}" for i in range(10)]}


def write_cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    labels = {"train": [0, 50, 99, 3], "test": [98, 1]}
    names = [f"f{i}".encode() for i in range(100)]
    _pickle(folder / "meta", {b"fine_label_names": names})
    for split in ("train", "test"):
        _pickle(folder / split, {b"data": _cifar_rows(len(labels[split])),
                                 b"fine_labels": labels[split]})
    return {"labels": labels, "classes": [n.decode() for n in names]}


def write_svhn(root: Path) -> dict:
    from scipy.io import savemat

    labels = {"train": [1, 10, 5], "test": [10, 3]}  # the file's 10 is the digit 0
    for split, ys in labels.items():
        x = RNG.integers(0, 255, (32, 32, 3, len(ys)), dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": np.array(ys)[:, None]})
    return {"labels": {k: [y % 10 for y in v] for k, v in labels.items()},
            "classes": [str(d) for d in range(10)]}


def _image(path: Path, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_tiny_imagenet(root: Path) -> dict:
    wnids = ["n01", "n02"]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, carp\nn02\tnewt\n")
    for k, wnid in enumerate(wnids):
        lines = []
        for i in range(2):
            _image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
            lines.append(f"{wnid}_{i}.JPEG\t{4 + k}\t8\t40\t50")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(lines) + "\n")
    ann = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        _image(root / "val" / "images" / f"val_{i}.JPEG")
        ann.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t31\t31")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return {"labels": {"train": [0, 0, 1, 1], "test": [1, 0, 1]},
            "classes": ["goldfish", "newt"]}


def write_coco(root: Path) -> dict:
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    for split, specs in (("train2017", [[1], [3, 18]]), ("val2017", [[18], [1, 3]])):
        images, anns = [], []
        for i, cat_ids in enumerate(specs):
            _image(root / split / f"{i:012d}.jpg", (80, 60))
            images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": 80,
                           "height": 60})
            for c in cat_ids:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c,
                             "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    return {"labels": {"train": [[0], [1, 2]], "test": [[2], [0, 1]]},
            "classes": ["person", "car", "dog"]}


def write_image_folder(root: Path) -> dict:
    for split, counts in (("train", (2, 3)), ("test", (1, 1))):
        for cls, n in zip(("ant", "bee"), counts, strict=True):
            for i in range(n):
                _image(root / split / cls / f"{i}.png", (50, 30))
    return {"labels": {"train": [0, 0, 1, 1, 1], "test": [0, 1]}, "classes": ["ant", "bee"]}


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn,
           "tiny_imagenet": write_tiny_imagenet, "coco": write_coco,
           "image_folder": write_image_folder}
GENERATED = {"digits": 10, "digits_multilabel": 10}


@pytest.mark.parametrize("name", list_datasets())
def test_every_data_set_loads_a_tiny_sample_by_the_contract(name, tmp_path):
    spec = dataset_spec(name)
    assert name in WRITERS or name in GENERATED, f"no sample writer for data set {name!r}"
    if name in GENERATED:
        cfg = DataConfig(dataset=name, train_size=GENERATED[name], test_size=GENERATED[name])
        expected = None
    else:
        expected = WRITERS[name](tmp_path)
        cfg = DataConfig(dataset=name, root=str(tmp_path))
    size = spec.native_size
    for split in ("train", "test"):
        data = load_split(cfg, split)
        n = len(data)
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, size, size)
        assert data.multilabel == spec.multilabel and tuple(data.mean) == tuple(spec.mean)
        k = data.num_classes
        if spec.multilabel:
            assert data.targets.shape == (n, k) and set(data.targets.unique().tolist()) <= {0, 1}
        else:
            assert data.targets.shape == (n,) and data.targets.dtype == torch.long
            assert 0 <= int(data.targets.min()) and int(data.targets.max()) < k
        if expected is not None:
            assert data.classes == expected["classes"]
            labels = expected["labels"][split]
            if spec.multilabel:
                assert [torch.nonzero(t).flatten().tolist() for t in data.targets] == labels
            else:
                assert data.targets.tolist() == labels
        assert data.has_boxes == spec.has_boxes
        if spec.has_boxes:
            assert data.box_offsets.shape == (n + 1,) and data.box_data.shape[1] == 5
            boxes = data.box_data
            assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= size).all()
            assert (boxes[:, 3] > boxes[:, 1]).all() and (boxes[:, 4] > boxes[:, 2]).all()
            for i in range(n):  # every box is of one of the image's classes
                present = (torch.nonzero(data.targets[i]).flatten().tolist()
                           if spec.multilabel else [int(data.targets[i])])
                assert set(data.boxes(i)[:, 0].long().tolist()) <= set(present)


def test_tiny_imagenet_boxes_are_scaled_with_the_image(tmp_path):
    """A box of the stored 64x64 grid (inclusive corners 4..40 x 8..50) at input size 32."""
    write_tiny_imagenet(tmp_path)
    data = load_split(DataConfig(dataset="tiny_imagenet", root=str(tmp_path), input_size=32),
                      "train")
    assert data.boxes(0).tolist() == [[0.0, 2.0, 4.0, 20.5, 25.5]]
