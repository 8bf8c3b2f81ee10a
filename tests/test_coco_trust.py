"""COCO annotations are trusted no further than they are checked (issue 30): a malformed file is
a one-line error naming the file and the field; unusable boxes are dropped and counted; an
image's file_name stays in its folder; an image of another pixel size than annotated has its
boxes scaled (same shape) or is refused (another shape)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.config import DataConfig
from engine.data import coco as coco_module
from engine.data import load_split
from engine.data.base import ImageSet
from engine.data.coco import (
    EMPTY_BOX,
    NOT_FINITE,
    OUTSIDE,
    RESCALED,
    UNKNOWN_IMAGE,
    read_coco,
)
from engine.data.readers import ReadOptions
from engine.errors import DataError

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
SIZE = 20
"""Model input side: a 40x20 image squashes by (0.5, 1), which the known answers use."""


def _png(path: Path, width: int, height: int, orientation: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def _ann(ann_id: int, image_id: int, bbox: list, category: int = 1, crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox,
            "iscrowd": crowd}


def _base() -> dict:
    """Two 40x20 images, one box each."""
    return {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                       {"id": 2, "file_name": "b.png", "width": 40, "height": 20}],
            "annotations": [_ann(1, 1, [4, 2, 8, 6]), _ann(2, 2, [0, 0, 10, 10], 3)],
            "categories": copy.deepcopy(CATS)}


def _write(root: Path, data: dict, split: str = "val2017", pixels: dict | None = None) -> Path:
    """The annotation file of ``split``, and a PNG per listed image at its annotated size
    unless ``pixels`` gives another (file_name -> (width, height))."""
    pixels = pixels or {}
    for image in data["images"]:
        size = pixels.get(image["file_name"], (image["width"], image["height"]))
        _png(root / split / image["file_name"], *size)
    return _annotations(root, data, split)


def _annotations(root: Path, data, split: str = "val2017") -> Path:
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data))
    return ann_file


def _read(root: Path, skip: bool = False, policy: str = "squash") -> ImageSet:
    """val2017 read as the registry reads it, without its cache."""
    d = read_coco(root, "val2017", ReadOptions(SIZE, policy, skip))
    return ImageSet("coco", "test", d.images, d.targets, d.classes, True, (0.5,) * 3,
                    (0.5,) * 3, d.box_data, d.box_offsets, d.skipped, d.dropped)


def _one_line_error(root: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        _read(root, **kw)
    message = str(info.value)
    assert "\n" not in message and "KeyError" not in message
    return message


# ----------------------------------------------------------------------------------------------
# A malformed file: a DataError naming the file and the field


def _set(path: tuple, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data
    return change


def _drop(path: tuple):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return data
    return change


MALFORMED = {
    "top-level list": (lambda d: [d], "top level must be a JSON object"),
    "missing categories": (_drop(("categories",)), "'categories' must be a list; it is missing"),
    "missing images": (_drop(("images",)), "'images' must be a list"),
    "missing annotations": (_drop(("annotations",)), "'annotations' must be a list"),
    "images not a list": (_set(("images",), {"1": "a.png"}), "'images' must be a list"),
    "bbox of 3 numbers": (_set(("annotations", 0, "bbox"), [1, 2, 3]),
                          "annotations[0].bbox must be 4 numbers"),
    "bbox with a string": (_set(("annotations", 1, "bbox"), [1, "2", 3, 4]),
                           "annotations[1].bbox must be 4 numbers"),
    "bbox with a bool": (_set(("annotations", 1, "bbox"), [1, 2, True, 4]),
                         "annotations[1].bbox must be 4 numbers"),
    "bbox missing": (_drop(("annotations", 0, "bbox")),
                     "annotations[0].bbox must be 4 numbers [x, y, width, height]; it is missing"),
    "unknown category id": (_set(("annotations", 1, "category_id"), 7),
                            "annotations[1].category_id must be the id of one of 'categories'"),
    "missing image_id": (_drop(("annotations", 0, "image_id")),
                         "annotations[0].image_id must be an integer"),
    "text image_id": (_set(("annotations", 0, "image_id"), "1"),
                      "annotations[0].image_id must be an integer"),
    "annotation not an object": (_set(("annotations", 1), [1, 2]),
                                 "annotations[1] must be an object"),
    "annotation without id": (_drop(("annotations", 0, "id")),
                              "annotations[0].id must be an integer"),
    "duplicate annotation id": (_set(("annotations", 1, "id"), 1),
                                "annotations[1].id must be unique"),
    "iscrowd 2": (_set(("annotations", 0, "iscrowd"), 2), "annotations[0].iscrowd must be 0 or 1"),
    "missing image id": (_drop(("images", 0, "id")), "images[0].id must be an integer"),
    "float image id": (_set(("images", 1, "id"), 2.0), "images[1].id must be an integer"),
    "duplicate image id": (_set(("images", 1, "id"), 1), "images[1].id must be unique"),
    "file_name not text": (_set(("images", 0, "file_name"), 5),
                           "images[0].file_name must be a file name"),
    "zero width": (_set(("images", 1, "width"), 0),
                   "images[1].width must be a positive number of pixels"),
    "missing height": (_drop(("images", 0, "height")), "images[0].height must be a positive"),
    "category without name": (_drop(("categories", 1, "name")), "categories[1].name must be text"),
    "category id text": (_set(("categories", 0, "id"), "person"),
                         "categories[0].id must be an integer"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_annotation_file_names_the_file_and_the_field(tmp_path, case):
    change, expected = MALFORMED[case]
    base = _base()
    _write(tmp_path, base)  # the images, at their annotated sizes
    ann_file = _annotations(tmp_path, change(copy.deepcopy(base)))
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and expected in message, message


@pytest.mark.parametrize("text, expected", [
    ("{\"images\": [", "is not valid JSON: Expecting value: line 1 column 13"),
    ("\"just text\"", "JSON object with 'images', 'annotations' and 'categories'; got a str"),
    ("[" * 100_000 + "]" * 100_000, "is not readable JSON: RecursionError"),
])
def test_text_that_is_not_an_annotation_object_is_named(tmp_path, text, expected):
    ann_file = _write(tmp_path, _base())
    ann_file.write_text(text)
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and expected in message, message


def test_the_annotation_file_is_read_bounded(tmp_path, monkeypatch):
    ann_file = _write(tmp_path, _base())
    cap = coco_module.ANNOTATION_CAP
    monkeypatch.setattr(coco_module, "ANNOTATION_CAP", 100)
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and "may be at most 100 bytes" in message
    monkeypatch.setattr(coco_module, "ANNOTATION_CAP", cap)
    ann_file.unlink()
    os.mkfifo(ann_file)  # would block a plain open() forever
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and "FIFO" in message


def test_where_reads_are_confined_an_annotation_file_outside_the_roots_is_refused(
        tmp_path, monkeypatch):
    ann_file = _write(tmp_path / "data", _base())
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("LOSSATTN_CONFINED_TO", str(tmp_path / "root"))
    message = _one_line_error(tmp_path / "data")
    assert str(ann_file) in message and "outside the data roots" in message


# ----------------------------------------------------------------------------------------------
# Unusable boxes: dropped, counted by reason; their class still labels the image


def _with_bad_boxes() -> dict:
    data = _base()
    nan, inf = math.nan, math.inf
    data["annotations"] += [
        _ann(10, 1, [nan, 2, 8, 6], 3), _ann(11, 1, [0, 0, inf, 5]),   # not finite: 2
        _ann(12, 1, [1, 1, 0, 5]), _ann(13, 1, [1, 1, 5, -2]),          # empty: 2
        _ann(14, 1, [40, 2, 5, 5]), _ann(15, 1, [-10, 0, 5, 5]),        # wholly outside: 2
        _ann(16, 99, [4, 2, 8, 6]), _ann(17, 98, [4, 2, 8, 6]),         # unknown image: 2
        _ann(18, 2, [-4, -2, 8, 6]),                                    # clipped to (0, 0, 4, 4)
        _ann(19, 2, [nan, 0, 1, 1], crowd=1),  # crowd: not a box unless asked, not counted
    ]
    return data


def test_nan_empty_outside_and_orphan_boxes_are_dropped_and_counted(tmp_path):
    _write(tmp_path, _with_bad_boxes())  # json writes NaN and Infinity, as a broken tool might
    data = _read(tmp_path)
    assert data.dropped == {UNKNOWN_IMAGE: 2, NOT_FINITE: 2, EMPTY_BOX: 2, OUTSIDE: 2,
                            RESCALED: 0}
    # known answers: x squashed by 0.5 (40 -> 20), y kept (20 -> 20)
    boxes = data.box_data.tolist()
    assert boxes == [[0.0, 2.0, 2.0, 6.0, 8.0], [1.0, 0.0, 0.0, 5.0, 10.0],
                     [0.0, 0.0, 0.0, 2.0, 4.0]]
    assert data.box_offsets.tolist() == [0, 1, 3]
    assert torch.isfinite(data.box_data).all()
    # the NaN box of image 1 was a car: the label stays
    assert data.targets.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_drop_counts_travel_through_the_registry_cache_and_subsets(tmp_path):
    _write(tmp_path, _with_bad_boxes())
    cfg = DataConfig(dataset="coco", root=str(tmp_path), test_split="val2017", input_size=SIZE)
    first, cached = load_split(cfg, "test"), load_split(cfg, "test")
    for data in (first, cached, first.subset(torch.tensor([1]))):
        assert data.dropped[NOT_FINITE] == 2 and data.dropped[UNKNOWN_IMAGE] == 2
    state = first.state()
    del state["dropped"]  # a state cached before the field existed
    assert ImageSet.from_state(state).dropped == {}


# ----------------------------------------------------------------------------------------------
# file_name stays inside the image folder


def _outward_names(tmp_path: Path) -> dict[str, str]:
    outside = tmp_path / "elsewhere" / "secret.png"
    _png(outside, 40, 20)
    link = tmp_path / "val2017" / "link.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    return {"absolute": str(outside), "dotdot": "../elsewhere/secret.png", "link": "link.png"}


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "link"])
def test_a_file_name_leading_out_of_the_image_folder_is_refused(tmp_path, kind):
    name = _outward_names(tmp_path)[kind]
    data = _base()
    _write(tmp_path, data)
    data["images"][1]["file_name"] = name
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    ann_file.write_text(json.dumps(data))
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and repr(name) in message and "1 image(s) refused" in message
    skipping = _read(tmp_path, skip=True)
    assert len(skipping) == 1 and len(skipping.skipped) == 1
    assert repr(name) in skipping.skipped[0]


def test_a_link_that_stays_inside_the_image_folder_is_read(tmp_path):
    data = _base()
    _write(tmp_path, data)
    (tmp_path / "val2017" / "sub").mkdir()
    (tmp_path / "val2017" / "sub" / "again.png").symlink_to(tmp_path / "val2017" / "b.png")
    data["images"][1]["file_name"] = "sub/again.png"
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    assert len(_read(tmp_path)) == 2


# ----------------------------------------------------------------------------------------------
# Pixel size against the annotation's width x height


def test_a_resized_copy_has_its_boxes_scaled_and_counted(tmp_path):
    data = _base()
    data["images"][0].update(width=80, height=40)  # annotated on the full-size original
    data["annotations"][0]["bbox"] = [8, 4, 16, 12]  # = [4, 2, 8, 6] on the 40x20 copy
    _write(tmp_path, data, pixels={"a.png": (40, 20)})
    result = _read(tmp_path)
    assert result.dropped[RESCALED] == 1
    assert result.boxes(0).tolist() == [[0.0, 2.0, 2.0, 6.0, 8.0]]
    # a side rounded to the pixel is the same shape (81x40 from 80x40 at 40x20 is 40.5 -> 40)
    data["images"][0].update(width=81, height=40)
    data["annotations"][0]["bbox"] = [8.1, 4, 16.2, 12]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    rounded = _read(tmp_path)
    assert rounded.dropped[RESCALED] == 1
    assert torch.allclose(rounded.boxes(0), torch.tensor([[0.0, 2.0, 2.0, 6.0, 8.0]]))


def test_an_image_of_another_shape_than_annotated_is_refused(tmp_path):
    data = _base()
    ann_file = _write(tmp_path, data, pixels={"b.png": (20, 40)})  # turned: sides swapped
    message = _one_line_error(tmp_path)
    assert str(ann_file) in message and "b.png: 20x40 pixels as stored" in message
    assert "annotated 40x20" in message and "skip_unreadable" in message
    skipping = _read(tmp_path, skip=True)
    assert len(skipping) == 1 and "b.png" in skipping.skipped[0]
    assert skipping.dropped[RESCALED] == 0


def test_exif_orientation_is_not_a_size_mismatch(tmp_path):
    """COCO's width x height and boxes are in the stored grid; the box turns with the image."""
    data = _base()
    _write(tmp_path, data)
    _png(tmp_path / "val2017" / "a.png", 40, 20, orientation=6)  # shown 20 wide, 40 high
    result = _read(tmp_path)
    assert result.dropped[RESCALED] == 0 and not result.skipped
    # stored [4, 2, 8, 6] -> upright x = 20 - y, y = x: (12..18, 4..12) -> squash (1, 0.5)
    assert result.boxes(0).tolist() == [[0.0, 12.0, 2.0, 18.0, 6.0]]


# ----------------------------------------------------------------------------------------------
# Shown by data check, recorded with a run


def test_data_check_prints_the_counts(tmp_path, capsys):
    _write(tmp_path, _with_bad_boxes())
    assert main(["data", "check", "coco", "--data-root", str(tmp_path), "--split", "test",
                 "--test-split", "val2017", "--input-size", str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert "coco/test: 2 images" in out and "3 boxes" in out
    for line in (f"2 {UNKNOWN_IMAGE}", f"2 {NOT_FINITE}", f"2 {EMPTY_BOX}", f"2 {OUTSIDE}",
                 f"0 {RESCALED}"):
        assert line in out, out


def test_a_training_run_records_the_counts(tmp_path):
    from engine.config import ModelConfig, RunConfig, TrainConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run

    _write(tmp_path / "coco", _with_bad_boxes())
    _write(tmp_path / "coco", _base(), split="train2017")
    data = DataConfig(dataset="coco", root=str(tmp_path / "coco"), input_size=32)
    run = RunStore(tmp_path / "runs").create(prepare_run_config(RunConfig(
        name="drops", model=ModelConfig(backbone="small_cnn"), data=data,
        train=TrainConfig(epochs=1, batch_size=2))))
    assert train_run(run, progress_bar=False) == "finished"
    progress = run.status().fields
    assert progress["dropped_test"][NOT_FINITE] == 2 and progress["dropped_test"][OUTSIDE] == 2
    assert progress["dropped_train"] == {reason: 0 for reason in progress["dropped_train"]}
