"""A data set reads only its own files, and the cache notices when one of them changes: a batch
replaced with its size and modification time put back, a stray ``data_batch_1.bak`` beside the
batches, a FIFO named like a batch (refused at once, never a hang), and a constant 16-bit image
that kept its grey level instead of turning black."""

import io
import logging
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import inputs
from engine.config import DataConfig
from engine.data import DataError, load_split
from engine.data.readers import read_mat
from engine.data.registry import fingerprint

HANG_S = 20.0
"""A read that takes longer than this is taken to hang (a FIFO opened blocking)."""


def _pickle(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))


def _cifar_batch(path: Path, n: int, value: int) -> None:
    _pickle(path, {b"data": np.full((n, 3072), value, np.uint8), b"labels": [i % 10 for i in
                                                                              range(n)]})


def _cifar10(root: Path, batches: dict[str, tuple[int, int]]) -> Path:
    """A CIFAR-10 folder: ``{file name: (images, pixel value)}`` plus the class names."""
    folder = root / "cifar-10-batches-py"
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    for name, (n, value) in batches.items():
        _cifar_batch(folder / name, n, value)
    return folder


def _values(cfg: DataConfig, split: str = "train") -> list[int]:
    return sorted(load_split(cfg, split).images[:, 0, 0, 0].unique().tolist())


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(path)
    return path


def _finishes(call, *args):
    """``call(*args)``'s result or exception, failing the test (not hanging it) when the call
    blocks; the blocked thread is a daemon, so it cannot hold up the test run's exit."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test to judge
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(HANG_S)
    if worker.is_alive():
        pytest.fail(f"{getattr(call, '__name__', call)} blocked for {HANG_S:.0f} s (a FIFO "
                    "opened blocking?)")
    assert time.monotonic() - started < HANG_S
    return outcome


# ----------------------------------------------------------------------------------------------
# The cache notices a file changed in place


def test_cache_notices_an_equal_size_batch_with_size_and_time_put_back(tmp_path):
    folder = _cifar10(tmp_path, {"test_batch": (4, 1), "data_batch_1": (4, 1),
                                 "data_batch_2": (4, 2)})
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    assert _values(cfg) == [1, 2]
    target = folder / "data_batch_2"
    before = target.stat()
    _cifar_batch(target, 4, 7)  # what `cp -p` of another equal-size batch does
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert _values(cfg) == [1, 7]


def test_fingerprint_notices_a_walked_file_rewritten_with_size_and_time_put_back(tmp_path):
    image = tmp_path / "imgs" / "a" / "0.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"first")
    before = image.stat()
    base = fingerprint([tmp_path / "imgs"])
    time.sleep(0.05)  # past the kernel's coarse clock tick, which stamps the change time
    image.write_bytes(b"other")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fingerprint([tmp_path / "imgs"]) != base


def test_fingerprint_keys_a_fifo_by_name_and_never_opens_it(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"1")
    fifo = _fifo(tmp_path / "d" / "y.png")
    walked = _finishes(fingerprint, [tmp_path / "d"])
    named = _finishes(fingerprint, [fifo])
    assert "error" not in walked and "error" not in named
    assert _finishes(fingerprint, [tmp_path / "d"])["value"] == walked["value"]


# ----------------------------------------------------------------------------------------------
# Only a data set's own file names are read; strays are named in a warning


def test_a_stray_batch_is_not_read_and_is_named_in_a_warning(tmp_path, caplog):
    folder = _cifar10(tmp_path, {"test_batch": (3, 1), "data_batch_1": (4, 1)})  # partial set
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    assert len(load_split(cfg, "train")) == 4
    _cifar_batch(folder / "data_batch_1.bak", 5, 9)
    _cifar_batch(folder / "test_batch.old", 5, 9)
    with caplog.at_level(logging.WARNING):
        train = load_split(cfg, "train")  # the key is unchanged: served from the cache
        test = load_split(cfg, "test")
    assert len(train) == 4 and len(test) == 3 and 9 not in train.images[:, 0, 0, 0].tolist()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("data_batch_1.bak" in m and "test_batch.old" not in m for m in warned), warned
    assert any("test_batch.old" in m for m in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(load_split(cfg, "train", use_cache=False)) == 4
    assert any("data_batch_1.bak" in r.getMessage() for r in caplog.records)


def test_cifar100_and_svhn_read_only_their_own_names(tmp_path, caplog):
    from scipy.io import savemat

    folder = tmp_path / "c100" / "cifar-100-python"
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    for name, n in (("train", 2), ("test", 2), ("train.bak", 7)):
        _pickle(folder / name, {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [0] * n})
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for name, n in (("test_32x32.mat", 2), ("test_32x32.mat.bak", 5)):
        savemat(svhn / name, {"X": np.zeros((32, 32, 3, n), np.uint8), "y": np.ones((n, 1))})
    with caplog.at_level(logging.WARNING):
        assert len(load_split(DataConfig(dataset="cifar100", root=str(tmp_path / "c100")),
                              "train")) == 2
        assert len(load_split(DataConfig(dataset="svhn", root=str(svhn)), "test")) == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "train.bak" in text and "test_32x32.mat.bak" in text


def _tiny(root: Path) -> Path:
    """A one-class Tiny ImageNet in its layout: two train images, one val image."""
    images = root / "train" / "n01" / "images"
    images.mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\n")
    for path in (images / "a.JPEG", images / "b.JPEG", root / "val" / "images" / "v.JPEG",
                 root / "val" / "images" / "w.JPEG"):
        Image.new("RGB", (64, 64), (90, 90, 90)).save(path, "JPEG")
    (root / "train" / "n01" / "n01_boxes.txt").write_text("a.JPEG\t0\t0\t9\t9\n"
                                                          "b.JPEG\t1\t1\t9\t9\n")
    (root / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t9\t9\n")
    return root


def test_tiny_imagenet_ignores_stray_lists_and_names_them(tmp_path, caplog):
    root = _tiny(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt.orig").write_text("w.JPEG\tn01\t0\t0\t9\t9\n")
    (root / "train" / "n01" / "n01_boxes.txt~").write_text("a.JPEG\t0\t0\t9\t9\n")
    (root / "train" / "n99").mkdir()
    cfg = DataConfig(dataset="tiny_imagenet", root=str(root))
    with caplog.at_level(logging.WARNING):
        assert len(load_split(cfg, "test")) == 1 and len(load_split(cfg, "train")) == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "val/val_annotations.txt.orig" in text and "train/n01/n01_boxes.txt~" in text
    assert "train/n99/" in text


# ----------------------------------------------------------------------------------------------
# Bounded reads: a FIFO or an oversized file is refused at once, naming it


def test_a_fifo_named_like_a_cifar_batch_is_refused_without_hanging(tmp_path):
    folder = _cifar10(tmp_path, {"test_batch": (3, 1), "data_batch_1": (4, 1)})
    _fifo(folder / "data_batch_2")
    outcome = _finishes(load_split, DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    assert isinstance(outcome.get("error"), DataError), outcome
    assert "data_batch_2" in str(outcome["error"]) and "FIFO" in str(outcome["error"])


def test_a_fifo_named_like_a_mat_file_is_refused_without_hanging(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8),
                                          "y": np.ones((1, 1))})
    fifo = _fifo(tmp_path / "train_32x32.mat")
    outcome = _finishes(load_split, DataConfig(dataset="svhn", root=str(tmp_path)), "train")
    assert isinstance(outcome.get("error"), DataError), outcome
    assert "train_32x32.mat" in str(outcome["error"]) and "FIFO" in str(outcome["error"])
    direct = _finishes(read_mat, fifo, "MIL")
    assert isinstance(direct.get("error"), DataError) and "train_32x32.mat" in str(
        direct["error"])


def test_a_fifo_in_place_of_a_tiny_imagenet_list_is_refused_without_hanging(tmp_path):
    root = _tiny(tmp_path / "tiny")
    (root / "val" / "val_annotations.txt").unlink()
    _fifo(root / "val" / "val_annotations.txt")
    outcome = _finishes(load_split, DataConfig(dataset="tiny_imagenet", root=str(root)), "test")
    assert isinstance(outcome.get("error"), DataError), outcome
    assert "val_annotations.txt" in str(outcome["error"]) and "FIFO" in str(outcome["error"])


def test_an_oversized_batch_is_refused_naming_it(tmp_path, monkeypatch):
    from engine.data import cifar

    _cifar10(tmp_path, {"test_batch": (3, 1), "data_batch_1": (4, 1)})
    monkeypatch.setattr(cifar, "BATCH_CAP", 1000)
    with pytest.raises(DataError, match=r"test_batch is .* at most 1,000 bytes"):
        load_split(DataConfig(dataset="cifar10", root=str(tmp_path)), "test", use_cache=False)


# ----------------------------------------------------------------------------------------------
# A constant high-bit image keeps its grey level


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_a_constant_16_bit_image_keeps_its_grey_level():
    flat = np.full((8, 8), 32768, np.uint16)
    loaded = inputs.image_from_bytes(_png(flat), (8, 8))
    assert loaded.shape == (3, 8, 8) and (loaded == 128).all()  # round(32768 / 65535 * 255)
    assert inputs.to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32))).getpixel(
        (0, 0)) == (128, 128, 128)
    assert inputs.to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel(
        (0, 0)) == (255, 255, 255)


def test_a_varying_16_bit_image_still_uses_its_own_range():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) + 1000)  # 1000..1063 of 65535
    loaded = inputs.image_from_bytes(_png(ramp), (8, 8))
    assert loaded.min() == 0 and loaded.max() == 255
