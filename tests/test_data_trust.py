"""Data never differs from what the user thinks: no stale cache, no silent skip, no mismatched
classes, one way from a file to a model input, and COCO's own conventions."""

import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_root, needs_data
from PIL import Image

from engine import inputs
from engine.cli import main
from engine.config import DataConfig
from engine.data import DataError, load_split
from engine.data.registry import fingerprint

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"


def _save(image: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def _folder(root: Path, per_class: int = 3, size=(20, 16)) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            _save(Image.fromarray(pixels), root / "train" / cls / f"{i}.png")
            _save(Image.fromarray(pixels[::-1].copy()), root / "test" / cls / f"{i}.png")
    return root


def _touch_later(path: Path) -> None:
    """A new modification time even on file systems with coarse timestamps."""
    later = time.time() + 5
    os.utime(path, (later, later))


# ----------------------------------------------------------------------------------------------
# The cache is keyed on what was read


def test_cache_sees_an_added_image(tmp_path):
    root = _folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="image_folder", root=str(root), input_size=16)
    assert len(load_split(cfg, "train")) == 6
    _save(Image.new("RGB", (9, 9), (255, 0, 0)), root / "train" / "a" / "new.png")
    assert len(load_split(cfg, "train")) == 7


def test_cache_sees_a_replaced_image(tmp_path):
    root = _folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="image_folder", root=str(root), input_size=16)
    first = load_split(cfg, "train").images.clone()
    target = root / "train" / "b" / "2.png"
    stamp = target.stat().st_mtime
    _save(Image.new("RGB", (20, 16), (0, 255, 0)), target)
    os.utime(target, (stamp + 5, stamp + 5))
    second = load_split(cfg, "train").images
    assert not torch.equal(first, second) and (second[-1, 1] == 255).all()


def test_cache_sees_an_image_that_appears_later(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "train" / "a" / "0.png").rename(tmp_path / "away.png")
    cfg = DataConfig(dataset="image_folder", root=str(root), input_size=16)
    assert len(load_split(cfg, "train")) == 5
    (tmp_path / "away.png").rename(root / "train" / "a" / "0.png")
    assert len(load_split(cfg, "train")) == 6


def _cifar_batch(path: Path, n: int, value: int) -> None:
    data = {b"data": np.full((n, 3072), value, np.uint8), b"labels": list(range(n))}
    path.write_bytes(pickle.dumps(data))


def test_cache_sees_a_replaced_cifar_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    _cifar_batch(folder / "test_batch", 10, 1)
    for k in (1, 2):
        _cifar_batch(folder / f"data_batch_{k}", 10, k)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    assert sorted(load_split(cfg, "train").images[:, 0, 0, 0].unique().tolist()) == [1, 2]
    _cifar_batch(folder / "data_batch_2", 10, 7)  # not one of the old "marker" files
    _touch_later(folder / "data_batch_2")
    assert sorted(load_split(cfg, "train").images[:, 0, 0, 0].unique().tolist()) == [1, 7]


@needs_data
def test_cache_sees_an_edited_coco_annotation_file(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(Path(data_root()) / "coco-val-slice", root)
    cfg = DataConfig(dataset="coco", root=str(root), test_split="val2017")
    before = load_split(cfg, "test")
    ann_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 1]  # people
    ann_file.write_text(json.dumps(data))  # edited in place
    _touch_later(ann_file)
    after = load_split(cfg, "test")
    assert before.targets[:, 0].sum() > 0 and after.targets[:, 0].sum() == 0


def test_fingerprint_covers_path_size_and_time(tmp_path):
    (tmp_path / "d").mkdir()
    file = tmp_path / "d" / "x.bin"
    file.write_bytes(b"1")
    missing = tmp_path / "later.json"
    base = fingerprint([tmp_path / "d", missing])
    file.write_bytes(b"22")
    grown = fingerprint([tmp_path / "d", missing])
    missing.write_text("{}")
    assert len({base, grown, fingerprint([tmp_path / "d", missing])}) == 3


# ----------------------------------------------------------------------------------------------
# Missing or unreadable images: an error naming them, or skipped and counted when allowed


@needs_data
def test_coco_with_missing_images_fails_naming_them_or_counts_them(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(Path(data_root()) / "coco-val-slice", root)
    images = sorted((root / "val2017").glob("*.jpg"))
    for path in images[:12]:
        path.unlink()
    (root / "val2017" / images[12].name).write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = DataConfig(dataset="coco", root=str(root), test_split="val2017")
    with pytest.raises(DataError) as info:
        load_split(cfg, "test")
    message = str(info.value)
    assert "13 of 24 listed image(s) are missing or unreadable" in message
    assert images[0].name in message and "skip_unreadable" in message
    assert message.count(".jpg") == 10  # up to 10 files named
    skipping = DataConfig(dataset="coco", root=str(root), test_split="val2017",
                          skip_unreadable=True)
    data = load_split(skipping, "test")
    assert len(data) == 11 and len(data.skipped) == 13


def test_skipped_images_are_recorded_with_the_run_and_shown_by_data_check(tmp_path, capsys):
    from engine.config import ModelConfig, RunConfig, TrainConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run

    root = _folder(tmp_path / "imgs", per_class=4)
    (root / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n broken")
    data = DataConfig(dataset="image_folder", root=str(root), input_size=32,
                      skip_unreadable=True)
    store = RunStore(tmp_path / "runs")
    run = store.create(prepare_run_config(RunConfig(
        name="skips", model=ModelConfig(backbone="small_cnn"), data=data,
        train=TrainConfig(epochs=1, batch_size=4))))
    assert train_run(run, progress_bar=False) == "finished"
    assert run.status().fields["skipped_train"] == 1 and run.status().fields["skipped_test"] == 0
    assert store.list()[0]["skipped"] == 1
    assert main(["data", "check", "image_folder", "--data-root", str(root),
                 "--skip-unreadable"]) == 0
    out = capsys.readouterr().out
    assert "image_folder/train: 8 images" in out
    assert "1 missing or unreadable image(s) skipped" in out
    assert main(["data", "check", "image_folder", "--data-root", str(root)]) == 2
    assert "bad.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A model is never evaluated on other classes without the user saying so


@needs_data
def test_evaluate_refuses_other_class_names(tmp_path, capsys):
    args = ["evaluate", str(SHIPPED), "--dataset", "tiny_imagenet", "--data-root", data_root(),
            "--metrics", "image", "--out", str(tmp_path / "eval")]
    assert main(args) == 2  # 10 classes both, but digits are not Tiny ImageNet's classes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on other classes" in err
    assert "--allow-class-mismatch" in err
    assert main([*args, "--allow-class-mismatch"]) == 0


def test_resume_refuses_data_whose_classes_changed(tmp_path):
    from engine.config import ModelConfig, RunConfig, TrainConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run

    root = _folder(tmp_path / "imgs")
    store = RunStore(tmp_path / "runs")
    run = store.create(prepare_run_config(RunConfig(
        name="renamed", model=ModelConfig(backbone="small_cnn"),
        data=DataConfig(dataset="image_folder", root=str(root), input_size=32),
        train=TrainConfig(epochs=1, batch_size=4))))
    assert train_run(run, progress_bar=False) == "finished"
    run.update_status(state="stopped")  # as if stopped at its end: resume loads last.pt
    assert train_run(run, resume=True, progress_bar=False) == "finished"
    for split in ("train", "test"):  # same count of classes, other names
        (root / split / "b").rename(root / split / "c")
    run.update_status(state="stopped")
    assert train_run(run, resume=True, progress_bar=False) == "failed"
    assert "other classes" in run.status().reason


# ----------------------------------------------------------------------------------------------
# One input path: the loader and an upload see the same pixels, for every PIL mode

MODES = [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"),
         ("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
         ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("P", "GIF"),
         ("I;16B", "TIFF"), ("LAB", "TIFF"), ("HSV", None)]


def _mode_image(mode: str, size=(24, 18)) -> Image.Image:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    plane = (size[1], size[0])
    arrays = {"I;16": rng.integers(0, 65535, plane).astype(np.uint16),
              "I;16B": rng.integers(0, 65535, plane).astype(">u2"),
              "I": rng.integers(-5000, 90000, plane).astype(np.int32),
              "F": rng.normal(0, 3, plane).astype(np.float32)}
    if mode in arrays:
        image = Image.fromarray(arrays[mode])
        assert image.mode == mode
        return image
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


@pytest.mark.parametrize("mode, fmt", MODES)
@pytest.mark.parametrize("policy", ["squash", "center_crop"])
def test_loader_and_upload_give_the_same_input(mode, fmt, policy, tmp_path):
    image = _mode_image(mode)
    if fmt is None:  # a mode no file format stores: only the upload's in-memory path applies
        with pytest.raises(OSError):
            image.save(io.BytesIO(), "PNG")
        return
    suffix = {"JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
    path = _save(image, tmp_path / "imgs" / "x" / f"0{suffix.get(fmt, '.png')}", fmt)
    _save(Image.new("RGB", (8, 8)), tmp_path / "imgs" / "y" / "0.png")
    from engine.data.image_folder import list_class_folder, read_image_files
    from engine.data.readers import ReadOptions

    classes, files = list_class_folder(tmp_path / "imgs")
    loaded = read_image_files(files, classes, ReadOptions(16, policy), "test").images[0]
    uploaded = inputs.image_from_bytes(path.read_bytes(), (16, 16), "x", policy)
    assert torch.equal(loaded, uploaded), (mode, fmt)
    assert loaded.shape == (3, 16, 16) and loaded.dtype == torch.uint8
    if mode in ("I;16", "I;16B", "I", "F"):  # high bit depth: rescaled, not clipped to white
        assert loaded.float().std() > 10 and loaded.float().mean() < 200


def test_alpha_is_composited_on_white_and_16_bit_uses_its_range():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (inputs.image_from_bytes(_bytes(clear), (4, 4)) == 255).all()
    deep = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = inputs.image_from_bytes(_bytes(deep), (8, 8))
    assert out.min() == 0 and out.max() == 255


def _bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _oriented(orientation: int) -> tuple[bytes, tuple[int, int]]:
    """A 12x6 JPEG-free PNG whose one bright pixel is at (x=9, y=1) in the stored grid."""
    pixels = np.zeros((6, 12, 3), np.uint8)
    pixels[1, 9] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    return _bytes(image, exif=exif.tobytes()), (9, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_image_and_boxes_alike(orientation, tmp_path):
    from PIL import ImageOps

    data, (x, y) = _oriented(orientation)
    upright, _ = inputs.decode(data)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(np.asarray(upright), reference)
    pixels, transform = inputs.load_for_model(data, (reference.shape[0], reference.shape[1]))
    box = transform((x, y, x + 1, y + 1))  # the bright pixel's box follows it
    row, col = np.argwhere(pixels[:, :, 0] == 255)[0]
    assert box == (col, row, col + 1, row + 1)
    path = tmp_path / "d" / "k" / "0.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    from engine.data.readers import decode_files

    loaded, _, _, _ = decode_files([path], 12, "squash", "t", False)
    assert np.array_equal(loaded[0], inputs.load_for_model(data, 12)[0])  # the loader too


# ----------------------------------------------------------------------------------------------
# Sizes that would cost far more than any input needs are refused early


def test_a_huge_aspect_ratio_is_refused_quickly():
    import resource

    strip = _bytes(Image.new("L", (1_000_000, 1)), optimize=True)
    assert len(strip) < 5000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(inputs.ImageInputError, match="1000000x1 pixels: an aspect ratio"):
        inputs.image_from_bytes(strip, (32, 32), "strip.png")
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # < 200 MB


def _claimed_size(width: int, height: int) -> bytes:
    """A small PNG whose header (with a valid checksum) claims width x height pixels."""
    import struct
    import zlib

    png = _bytes(Image.new("L", (10, 10)))
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


@pytest.mark.parametrize("side, message", [(8000, "8000x8000 pixels; the limit"),
                                           (60000, "decompression bomb")])
def test_decompression_bombs_are_refused_before_decoding(side, message, tmp_path):
    bomb = _claimed_size(side, side)
    start = time.perf_counter()
    with pytest.raises(inputs.ImageInputError, match=message):
        inputs.image_from_bytes(bomb, (32, 32))
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded
    path = tmp_path / "imgs" / "a" / "bomb.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(bomb)
    _save(Image.new("RGB", (8, 8)), tmp_path / "imgs" / "b" / "ok.png")
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path / "imgs"), input_size=16)
    with pytest.raises(DataError, match=f"bomb.png.*{message}"):
        load_split(cfg, "train"), load_split(cfg, "test")


def test_a_very_wide_photo_is_cropped_without_a_huge_intermediate():
    wide = Image.new("RGB", (4000, 400), (10, 20, 30))
    out = inputs.image_from_bytes(_bytes(wide, "JPEG"), (32, 32), policy="center_crop")
    assert out.shape == (3, 32, 32)


def test_upload_errors_say_what_is_wrong_without_a_repr():
    for payload, expected in ((b"hello", "is not an image"), (b"", "is empty"),
                              (_bytes(Image.new("RGB", (40, 40)))[:60], "could not be decoded")):
        with pytest.raises(inputs.ImageInputError, match=expected) as info:
            inputs.image_from_bytes(payload, (32, 32), "mine.png")
        assert "mine.png" in str(info.value) and " object at 0x" not in str(info.value)


def test_folder_splits_are_cached_per_seed_and_never_overlap(tmp_path):
    """A folder without train/test is split 80/20 by data.seed: the cache must tell seeds
    apart, or a test split of one seed could meet the training split of another."""
    root = tmp_path / "one"
    for cls in ("a", "b"):
        for i in range(10):
            _save(Image.new("RGB", (8, 8), (i * 20, 40 if cls == "a" else 0, 0)),
                  root / cls / f"{i}.png")

    def split(seed, name):
        data = load_split(DataConfig(dataset="image_folder", root=str(root), input_size=8,
                                     seed=seed), name)
        return {tuple(img.flatten().tolist()) for img in data.images}

    test0 = split(0, "test")
    test1 = split(1, "test")
    assert test0 != test1  # different seeds, different splits (not one served from cache)
    assert not split(1, "train") & test1 and not split(0, "train") & test0


def test_cache_follows_linked_folders(tmp_path):
    real = _folder(tmp_path / "real")
    root = tmp_path / "linked"
    root.mkdir()
    (root / "train").symlink_to(real / "train")
    (root / "test").symlink_to(real / "test")
    cfg = DataConfig(dataset="image_folder", root=str(root), input_size=16)
    assert len(load_split(cfg, "train")) == 6
    _save(Image.new("RGB", (9, 9)), real / "train" / "a" / "new.png")  # behind the link
    assert len(load_split(cfg, "train")) == 7


def test_fingerprint_gives_up_on_a_huge_tree(tmp_path, monkeypatch):
    from engine.data import registry

    monkeypatch.setattr(registry, "MAX_FINGERPRINT_FOLDERS", 5)
    for i in range(8):
        (tmp_path / f"d{i}").mkdir()
    with pytest.raises(DataError, match="more than 5 folders"):
        fingerprint([tmp_path])
