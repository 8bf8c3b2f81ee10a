"""``evaluate``: every metric of a model (a checkpoint or a run) over a data set, at ξ values."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import add_command, add_faithfulness_flags, parse_floats, runs_dir_parent


def register(sub) -> None:
    p = add_command(
        sub, "evaluate", parents=[runs_dir_parent()],
        description="Every metric of a model over a data set, at its own ξ or a grid of them: "
                    "image accuracy (or mAP), patch precision / recall / F, localization and, "
                    "when asked, faithfulness against the Grad-CAM family. The backbone runs "
                    "once per image (a progress bar shows it); each further ξ is a cheap "
                    "re-decode. Prints a summary; writes report.json and CSV tables.",
        examples=["evaluate first",
                  "evaluate checkpoints/digits_small_cnn_la.pt --xi-grid 0,0.1,0.2,0.5,1",
                  "evaluate first --metrics image,patch --out eval/",
                  "evaluate first --faithfulness-images 200"])
    p.add_argument("source", help="a checkpoint .pt file, or a run name (its best checkpoint)")
    p.add_argument("--dataset", "--data", dest="dataset", metavar="NAME",
                   help="evaluate on another registered data set (default: the model's own; "
                        "python -m engine data list names them)")
    p.add_argument("--data-root", metavar="DIR",
                   help="the folder holding the data (default: the model's, else "
                        "$LOSSATTN_DATA, else ./data)")
    p.add_argument("--test-size", type=int, metavar="N",
                   help="evaluate on this many test images (default: the model's data's)")
    p.add_argument("--set", action="append", metavar="data.FIELD=VALUE",
                   help="change another field of the data section (repeatable)")
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="which split (default: test)")
    p.add_argument("--xi-grid", metavar="X,X,...",
                   help="comma-separated ξ values, e.g. 0,0.1,0.2,...,1 (default: the model's "
                        "ξ only)")
    p.add_argument("--metrics", default="auto",
                   help="auto, or a comma list of image, patch, localization, faithfulness "
                        "(default: auto, every group the model and the data allow, "
                        "faithfulness aside)")
    p.add_argument("--faithfulness-images", type=int, default=0, metavar="N",
                   help="also measure faithfulness on this many images, e.g. 200 (default: 0, "
                        "not measured)")
    add_faithfulness_flags(p, "faithfulness: ")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto, a GPU if there is one)")
    p.add_argument("--out", metavar="DIR",
                   help="report folder (default: the run's eval/, or ./eval-NAME for a file)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate on data whose class names differ from the model's (default: "
                        "refused)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (default: bars on stderr)")
    p.set_defaults(func=cmd_evaluate)


def _data_of(args: argparse.Namespace, ckpt: dict):
    """The data set to evaluate on: the model's own, with the flags' changes."""
    from engine.config import DataConfig, config_from_dict, parse_setting
    from engine.data import load_split

    fields = dict(ckpt["run_config"].get("data", {}))
    for flag, key in (("dataset", "dataset"), ("data_root", "root"), ("test_size", "test_size")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    for item in args.set or []:
        _, key, value = parse_setting(item, "evaluate --set", sections=("data",))
        fields[key] = value
    return load_split(config_from_dict(DataConfig, fields, section="data"), args.split)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.checkpoint import check_classes
    from engine.device import resolve_device
    from engine.errors import EvaluationError
    from engine.evaluate import evaluate_model, format_summary, write_report
    from engine.runs import load_model_source

    device = resolve_device(args.device, "--device")
    model, ckpt, run = load_model_source(args.source, args.runs_dir)
    data = _data_of(args, ckpt)
    if data.num_classes != model.config.num_classes:
        raise EvaluationError(f"the model predicts {model.config.num_classes} classes but "
                              f"{data.name} has {data.num_classes}")
    check_classes(ckpt.get("classes"), data.classes, f"the model {args.source}",
                  force=args.allow_class_mismatch)
    xi_grid = parse_floats(args.xi_grid, "--xi-grid") if args.xi_grid else None
    report = evaluate_model(model.to(device), data, device, xi_grid=xi_grid,
                            groups=args.metrics, faithfulness_images=args.faithfulness_images,
                            progress=not args.quiet, mask=args.mask,
                            random_draws=args.random_draws)
    report["source"] = str(args.source)
    default_out = run.path / "eval" if run else Path(f"eval-{Path(args.source).stem}")
    paths = write_report(report, args.out or default_out)
    print(format_summary(report))
    if "faithfulness" in report:
        from engine.evaluate import faithfulness_rows

        faith = report["faithfulness"]
        print(f"faithfulness, mask {faith['mask']} (references: maps that know nothing of the "
              "model):")
        for row in faithfulness_rows(faith):
            values = {k: v for k, v in row.items() if k not in ("method", "kind", "mask")}
            print(f"  {row['method']:15s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
        if "skipped" in faith:
            print(f"  skipped: {faith['skipped']}")
    print("collect {:.1f}s, metrics {:.2f}s per ξ; wrote {}".format(
        report["timing"]["collect_s"], max(report["timing"]["metrics_s_per_xi"]),
        ", ".join(str(p) for p in paths)))
    return 0
