"""Data sets: the embedded digits, the batch pipeline, image folders, and the real data slices."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_root, needs_data

from engine.config import ConfigError, DataConfig
from engine.data import DataError, load_split
from engine.data.base import Augment, AugmentDraw, BatchStream, apply_augment
from engine.data.digits import generate


def test_digits_deterministic_by_seed():
    a = generate("train", 40, 32, False, seed=3)
    b = generate("train", 40, 32, False, seed=3)
    c = generate("train", 40, 32, False, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("canvas", [32, 64])
def test_single_label_digits_have_one_box_of_their_class(canvas):
    data = generate("test", 60, canvas, False, seed=0)
    assert data.images.shape == (60, 3, canvas, canvas) and data.images.dtype == torch.uint8
    for i in range(len(data)):
        boxes = data.boxes(i)
        assert boxes.shape == (1, 5)
        assert int(boxes[0, 0]) == int(data.targets[i])
        x0, y0, x1, y1 = boxes[0, 1:].tolist()
        assert 0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas
        # The box holds the digit: its pixels are brighter than the canvas on average.
        img = data.images[i].float().mean(0)
        assert img[int(y0):int(y1), int(x0):int(x1)].mean() > img.mean()


def test_multilabel_digits_boxes_match_labels():
    data = generate("train", 80, 32, True, seed=0)
    counts = set()
    for i in range(len(data)):
        classes = sorted(int(c) for c in data.boxes(i)[:, 0])
        assert classes == sorted(torch.nonzero(data.targets[i]).flatten().tolist())
        counts.add(len(classes))
    assert counts <= {1, 2, 3} and len(counts) >= 2


def test_train_and_test_digits_use_disjoint_scans():
    from engine.data.digits import _sources

    src = _sources(0)
    train = {a.tobytes() for a in src["train"][0]}
    assert not any(a.tobytes() in train for a in src["test"][0])


def test_load_split_caches_and_respects_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSATTN_CACHE", str(tmp_path))
    cfg = DataConfig(train_size=50, test_size=20)
    first = load_split(cfg, "train")
    assert len(first) == 50 and len(list(tmp_path.glob("digits-train-*.pt"))) == 1
    again = load_split(cfg, "train")
    assert torch.equal(first.images, again.images)
    (next(tmp_path.glob("digits-train-*.pt"))).write_bytes(b"garbage")  # damaged cache
    assert torch.equal(load_split(cfg, "train").images, first.images)
    assert len(load_split(cfg, "test")) == 20


def test_augment_known_answer():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255  # a bright top-left pixel
    draw = AugmentDraw(oy=torch.tensor([0, 2]), ox=torch.tensor([0, 1]),
                       flip=torch.tensor([False, True]))
    out = apply_augment(images, Augment(crop_pad=1, flip=True), draw)
    # Offset 0 with pad 1 shifts content by +1; offset (2, 1) by (-1, 0), then flipped.
    assert out[0, 0, 1, 1] == 255 and out[0].sum() == 255
    assert out[1].sum() == 0  # the pixel moved out of the crop
    images[:, 0, 1, 1] = 100
    out = apply_augment(images, Augment(crop_pad=1, flip=True), draw)
    assert out[1, 0, 0, 4 - 1 - 1] == 100  # (1,1) -> crop (0,1) -> flip (0,2)


def test_batch_stream_is_deterministic_and_ddp_slices_the_batch():
    data = generate("train", 64, 32, False, seed=0)
    kwargs = {"augment": Augment(2, True), "shuffle": True, "seed": 5, "epoch": 1}
    full = list(BatchStream(data, 16, torch.device("cpu"), **kwargs))
    again = list(BatchStream(data, 16, torch.device("cpu"), **kwargs))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    ranks = [list(BatchStream(data, 16, torch.device("cpu"), rank=r, world=2, **kwargs))
             for r in range(2)]
    for step, (x, y, idx) in enumerate(full):
        torch.testing.assert_close(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][2], ranks[1][step][2]]), idx)
    resumed = list(BatchStream(data, 16, torch.device("cpu"), start_step=2, **kwargs))
    assert torch.equal(resumed[0][0], full[2][0])


def _write_images(folder: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    specs = [("RGB", (40, 30)), ("L", (64, 64)), ("RGBA", (20, 50)), ("P", (33, 33)),
             ("I;16", (16, 16)), ("CMYK", (80, 60))]
    for k, cls in enumerate(["cat", "dog"]):
        (folder / cls).mkdir(parents=True)
        for i, (mode, size) in enumerate(specs):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(folder / cls / f"{i}.png" if mode != "CMYK"
                                                    else folder / cls / f"{i}.jpg")
        (folder / cls / "notes.txt").write_text("not an image")
        (folder / cls / "broken.png").write_bytes(b"\x89PNG garbage")


def test_image_folder_any_size_and_mode(tmp_path):
    _write_images(tmp_path / "imgs")
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path / "imgs"), input_size=24)
    with pytest.raises(DataError, match=r"\d of \d+ listed image\(s\) are missing or "
                                        r"unreadable: .*broken.png.*skip_unreadable"):
        load_split(cfg, "train"), load_split(cfg, "test")
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path / "imgs"), input_size=24,
                     skip_unreadable=True)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.classes == ["cat", "dog"]
    assert train.images.shape[1:] == (3, 24, 24)
    assert len(train) + len(test) == 12  # broken.png skipped (when allowed), notes.txt ignored
    skipped = [s.split(":")[0] for s in train.skipped + test.skipped]
    assert sorted(Path(s).parent.name + "/" + Path(s).name for s in skipped) == [
        "cat/broken.png", "dog/broken.png"]
    assert not train.has_boxes


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs root"):
        load_split(DataConfig(dataset="image_folder"), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_split(DataConfig(dataset="image_folder", root=str(tmp_path / "nope")), "train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_split(DataConfig(dataset="image_folder", root=str(tmp_path / "empty")), "train")


def test_missing_data_folder_says_where(tmp_path):
    with pytest.raises(DataError) as info:
        load_split(DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    assert str(tmp_path) in str(info.value) and "download" in str(info.value)
    with pytest.raises(DataError, match="Tiny ImageNet not found"):
        load_split(DataConfig(dataset="tiny_imagenet", root=str(tmp_path)), "test")


def test_corrupt_cifar_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(b"not a pickle")
    (folder / "test_batch").write_bytes(b"\x80\x02cos\nsystem\n.")  # a pickle that runs code
    with pytest.raises(DataError, match="not a readable CIFAR"):
        load_split(DataConfig(dataset="cifar10", root=str(tmp_path)), "test")


def test_unknown_dataset_lists_known():
    cfg = DataConfig(dataset="mnist")  # a name is the registry's to check, when it is asked for
    with pytest.raises(ConfigError) as info:
        load_split(cfg, "test")
    assert str(info.value).startswith("data.dataset must be one of")
    for name in ("digits", "cifar10", "tiny_imagenet", "coco", "image_folder"):
        assert name in str(info.value)


@needs_data
def test_tiny_imagenet_slice():
    cfg = DataConfig(dataset="tiny_imagenet", root=data_root())
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (1000, 500)
    assert train.num_classes == 10 and train.classes[0] == "Egyptian cat"
    assert torch.bincount(test.targets).tolist() == [50] * 10
    assert train.images.shape[1:] == (3, 64, 64)
    for data in (train, test):
        assert data.box_offsets.diff().eq(1).all()  # one box per image
        assert torch.equal(data.box_data[:, 0].long(), data.targets)
        assert (data.box_data[:, 1:] >= 0).all() and (data.box_data[:, 1:] <= 64).all()
    # The file's first annotation is test image 0: inclusive corners become a half-open box.
    ann = Path(data_root()) / "tiny-imagenet-200-10cls/val/val_annotations.txt"
    _, wnid, x0, y0, x1, y1 = ann.read_text().splitlines()[0].split()
    assert test.boxes(0)[0, 1:].tolist() == [float(x0), float(y0), float(x1) + 1, float(y1) + 1]
    wnids = (Path(data_root()) / "tiny-imagenet-200-10cls/wnids.txt").read_text().split()
    assert int(test.targets[0]) == wnids.index(wnid)


@needs_data
def test_cifar10_partial_batches():
    cfg = DataConfig(dataset="cifar10", root=data_root())
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (932, 932)
    assert test.classes[:3] == ["airplane", "automobile", "bird"]
    labels = (Path(data_root()) / "cifar10-subset/labels_all/test_batch.labels.txt").read_text()
    expected = [int(v) for v in labels.split()][:932]
    assert test.targets.tolist() == expected


@needs_data
def test_coco_val_slice():
    cfg = DataConfig(dataset="coco", root=data_root(), test_split="val2017")
    test = load_split(cfg, "test")
    assert len(test) == 24 and test.num_classes == 80 and test.multilabel
    assert test.classes[0] == "person"
    # COCO's convention: the 2 crowd regions are not ground-truth boxes (opt in to count them)
    assert test.box_data.shape[0] == 221
    crowd = load_split(DataConfig(dataset="coco", root=data_root(), test_split="val2017",
                                  crowd_boxes=True), "test")
    assert crowd.box_data.shape[0] == 223
    assert test.images.shape[1:] == (3, 64, 64)
    for i in range(len(test)):  # multi-hot label = classes of every annotation, crowd included
        assert set(crowd.boxes(i)[:, 0].long().tolist()) == set(
            torch.nonzero(test.targets[i]).flatten().tolist())
    assert int(test.targets.sum(0).gt(0).sum()) == 47
    cropped = load_split(DataConfig(dataset="coco", root=data_root(), test_split="val2017",
                                    resize="center_crop"), "test")
    assert cropped.box_data.shape[0] < 221  # a crop drops boxes...
    assert torch.equal(cropped.targets, test.targets)  # ...but never an image-level label
    with pytest.raises(DataError, match="instances_train2017.json"):
        load_split(cfg, "train")


def test_env_data_root_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSATTN_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_split(DataConfig(dataset="svhn"), "test")
    assert str(tmp_path) in str(info.value) and os.path.join("data") in str(info.value)


def test_svhn_download_fetches_both_splits(tmp_path, monkeypatch):
    """--download must fetch the train split as well as the test split (separate files)."""
    import torchvision
    from scipy.io import savemat

    calls = []

    class FakeSVHN:  # stands in for the network: writes what torchvision would
        def __init__(self, root, split, download):
            calls.append(split)
            rng = np.random.default_rng(len(calls))
            n = 5 if split == "train" else 3
            savemat(Path(root) / f"{split}_32x32.mat",
                    {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8),
                     "y": np.array([[10], [1], [2], [3], [4]][:n])})

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    cfg = DataConfig(dataset="svhn", root=str(tmp_path), download=True)
    train = load_split(cfg, "train")
    test = load_split(cfg, "test")
    assert sorted(calls) == ["test", "train"]
    assert (len(train), len(test)) == (5, 3)
    assert train.targets.tolist() == [0, 1, 2, 3, 4]  # label 10 is the digit 0


def test_digit_scans_are_sklearns_without_importing_sklearn():
    """The embedded digits read scikit-learn's scans from its data file: the same arrays as
    load_digits, and no scikit-learn import (135 MiB in the app server)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from engine.data.digits import _sklearn_digits

    scans, labels = _sklearn_digits()
    reference = load_digits()
    assert np.array_equal(scans, reference.images) and np.array_equal(labels, reference.target)
    probe = ("import sys; from engine.data.digits import generate;"
             "generate('test', 8, 32, False, 0);"
             "print('SKLEARN' if 'sklearn' in sys.modules else 'NO SKLEARN')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("NO SKLEARN")
