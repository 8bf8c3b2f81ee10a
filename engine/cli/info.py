"""``models`` and ``data``: what is registered, and whether a data set's files are there."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered backbones, heads and presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="list data sets, or check that one loads")
    p.add_argument("action", choices=["list", "check"])
    p.add_argument("dataset", nargs="?")
    p.add_argument("--data-root")
    p.add_argument("--input-size", type=int)
    p.add_argument("--download", action="store_true")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="count missing or unreadable images instead of failing on them")
    p.add_argument("--split", choices=["train", "test", "both"], default="both",
                   help="check one split only (a slice of COCO holds only val2017)")
    p.add_argument("--train-split", help="the train split's name (data.train_split, e.g. "
                   "COCO train2017)")
    p.add_argument("--test-split", help="the test split's name (data.test_split, e.g. COCO "
                   "val2017)")
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
