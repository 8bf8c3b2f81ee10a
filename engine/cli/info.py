"""``models`` and ``data``: what is registered, and whether a data set's files are there."""

from __future__ import annotations

import argparse

from engine.cli.common import add_command

DATA_ACTIONS = {"list": "the registered data sets, one line each",
                "check": "load one data set's splits: counts, classes, boxes (proves the files "
                         "are there)"}


def register(sub) -> None:
    p = add_command(
        sub, "models", description="The registered backbones and heads, with one line each, "
                                   "and the presets that train and sweep take (--preset).",
        examples=["models", "models | grep capsule"])
    p.set_defaults(func=cmd_models)

    p = add_command(
        sub, "data", description="The data sets: list them, or check that one loads. The "
                                 "embedded digits need no files; the others are looked for "
                                 "under --data-root, $LOSSATTN_DATA and ./data.",
        examples=["data list", "data check digits", "data check cifar10 --download",
                  "data check coco --data-root /data --split test"])
    actions = p.add_argument_group("actions")
    # Named by its choices: "required: {list,check}" tells a newcomer what to type.
    actions.add_argument("action", choices=list(DATA_ACTIONS),
                         metavar="{" + ",".join(DATA_ACTIONS) + "}",
                         help="; ".join(f"{k}: {v}" for k, v in DATA_ACTIONS.items()))
    actions.add_argument("dataset", nargs="?", metavar="DATASET",
                         help="check: the data set's name (see data list)")
    p.add_argument("--data-root", metavar="DIR",
                   help="the folder holding the data or a folder above it (default: "
                        "$LOSSATTN_DATA, else ./data)")
    p.add_argument("--input-size", type=int, metavar="N",
                   help="side of the square input (default: the data set's native size)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR / SVHN files that are missing (default: no network)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="count missing or unreadable images instead of failing on them "
                        "(default: fail, naming them)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both",
                   help="check one split only, e.g. a slice of COCO holding only val2017 "
                        "(default: both)")
    p.add_argument("--train-split", metavar="NAME",
                   help="the train split's folder name (data.train_split, e.g. COCO "
                        "train2017; default: the data set's own)")
    p.add_argument("--test-split", metavar="NAME",
                   help="the test split's folder name (data.test_split, e.g. COCO val2017; "
                        "default: the data set's own)")
    p.set_defaults(func=cmd_data)


def cmd_models(args: argparse.Namespace) -> int:
    # The catalog, not engine.models: listing must not wait on importing torch.
    from engine.catalog import backbone_catalog, head_catalog
    from engine.presets import PRESETS

    print("backbones:")
    for name, text in backbone_catalog().items():
        print(f"  {name:24s} {text}")
    print("heads:")
    for name, text in head_catalog().items():
        print(f"  {name:24s} {text}")
    print("presets (train / sweep --preset NAME; what you give explicitly wins):")
    for name, preset in PRESETS.items():
        print(f"  {name:24s} {preset.description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from engine.config import DataConfig
    from engine.data import dataset_spec, list_datasets, load_split

    if args.action == "list":
        for name in list_datasets():
            spec = dataset_spec(name)
            kind = "multi-label" if spec.multilabel else "single-label"
            boxes = ", boxes" if spec.has_boxes else ""
            print(f"  {name:18s} {spec.native_size}px {kind}{boxes}: {spec.description}")
        return 0
    if not args.dataset:
        raise ValueError("data check needs a data set name (see: python -m engine data list)")
    cfg = DataConfig(dataset=args.dataset, root=args.data_root, input_size=args.input_size,
                     download=args.download, skip_unreadable=args.skip_unreadable,
                     train_split=args.train_split, test_split=args.test_split)
    for split in ("train", "test") if args.split == "both" else (args.split,):
        data = load_split(cfg, split)
        boxes = (f", {data.box_data.shape[0]} boxes" if data.has_boxes else ", no boxes")
        skipped = (f"; {len(data.skipped)} missing or unreadable image(s) skipped, e.g. "
                   f"{data.skipped[0]}" if data.skipped else "")
        print(f"{args.dataset}/{split}: {len(data)} images {tuple(data.images.shape[1:])}, "
              f"{data.num_classes} classes{boxes}; classes: {data.classes[:10]}"
              f"{' ...' if data.num_classes > 10 else ''}{skipped}")
        if data.dropped:
            print(f"  {dropped_text(data.dropped)}")
    return 0


def dropped_text(dropped: dict[str, int]) -> str:
    """What a reader's annotation checks counted (``ImageSet.dropped``), in one line: every
    reason, zeros included, so that a clean set is seen to have been checked."""
    return "annotation checks: " + "; ".join(f"{count} {reason}"
                                             for reason, count in dropped.items())
